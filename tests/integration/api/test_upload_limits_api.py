"""Uploads over TUNEFORGE_MAX_UPLOAD_BYTES are refused with 413 and leave nothing behind, on both stacks.

What stores the bytes bounds them: the control plane's own URL (the local store, and S3 uploads of
undeclared size, which it relays) stops reading past the limit; a direct S3 URL is signed for the
size the client declared, which must be within the limit.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from tests_support import assert_error

from app.db.session import transaction
from app.main import create_app
from app.services import auth

LIMIT = 64
DATA = b"prompt,completion\n" + b"q,a\n" * 40


@pytest.fixture(params=["embedded", "postgres_s3"])
def small_limit_client(request, stack_settings_factory):  # type: ignore[no-untyped-def]
    app = create_app(stack_settings_factory(request.param, max_upload_bytes=LIMIT))
    with TestClient(app) as client:
        with transaction(app.state.ctx.sessions) as session:
            token = auth.create_token(session, auth.get_or_create_user(session, "limits", "bob"))
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def test_upload_over_limit_is_413_at_the_put_and_leaves_nothing(small_limit_client: TestClient) -> None:
    client = small_limit_client
    begun = client.post("/v2/datasets/upload", json={"fileName": "big.csv"}).json()
    url = begun["presignedUrl"]
    # No declared size (the Predibase SDK declares none): the control plane takes the bytes, S3 or not.
    assert url.startswith(f"{client.base_url}/blobs/")
    assert_error(client.put(url, content=DATA), 413, "limit")
    chunked = client.put(url, content=iter([DATA[:40], DATA[40:]]))  # no Content-Length to refuse early
    assert_error(chunked, 413, "limit")
    finish = client.put("/v2/datasets/upload", json={"name": "big", "uploadToken": begun["uploadToken"]})
    assert_error(finish, 422, "PUT the file")
    assert client.get("/v2/datasets").json()["count"] == 0


def test_declared_size_over_limit_is_413_before_any_byte(small_limit_client: TestClient) -> None:
    response = small_limit_client.post(
        "/v2/datasets/upload", json={"fileName": "big.csv", "sizeBytes": LIMIT + 1}
    )
    assert_error(response, 413, "sizeBytes")


def test_declared_size_within_limit_gets_a_url_bound_to_it(small_limit_client: TestClient) -> None:
    client = small_limit_client
    data = DATA[:LIMIT]
    begun = client.post("/v2/datasets/upload", json={"fileName": "ok.csv", "sizeBytes": len(data)}).json()
    url = begun["presignedUrl"]
    if url.startswith(str(client.base_url)):
        client.put(url, content=data).raise_for_status()
    else:  # a direct S3 URL: Content-Length is one of the signed headers
        assert parse_qs(urlsplit(url).query)["X-Amz-SignedHeaders"] == ["content-length;host"]
        httpx.put(url, content=data).raise_for_status()
    finish = client.put("/v2/datasets/upload", json={"name": "ok", "uploadToken": begun["uploadToken"]})
    assert finish.status_code == 200, finish.text
    assert finish.json()["sizeBytes"] == len(data)
