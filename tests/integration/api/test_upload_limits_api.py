"""Uploads over TUNEFORGE_MAX_UPLOAD_BYTES are refused with 413 and leave nothing behind."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from tests_support import assert_error

from app.db.session import transaction
from app.main import create_app
from app.services import auth

LIMIT = 64


@pytest.fixture(params=["embedded", "postgres_s3"])
def small_limit_client(request, stack_settings_factory):  # type: ignore[no-untyped-def]
    app = create_app(stack_settings_factory(request.param, max_upload_bytes=LIMIT))
    with TestClient(app) as client:
        with transaction(app.state.ctx.sessions) as session:
            token = auth.create_token(session, auth.get_or_create_user(session, "limits", "bob"))
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def test_upload_over_limit_is_413(small_limit_client: TestClient) -> None:
    client = small_limit_client
    data = b"prompt,completion\n" + b"q,a\n" * 40
    begun = client.post("/v2/datasets/upload", json={"fileName": "big.csv"}).json()
    url = begun["presignedUrl"]
    if url.startswith(str(client.base_url)):
        # The local store enforces the limit while the bytes stream in.
        assert_error(client.put(url, content=data), 413, "limit")
        finish = client.put("/v2/datasets/upload", json={"name": "big", "uploadToken": begun["uploadToken"]})
        assert_error(finish, 422, "PUT the file")
    else:
        # A presigned S3 PUT bypasses us; the size is checked when the upload is registered.
        httpx.put(url, content=data).raise_for_status()
        finish = client.put("/v2/datasets/upload", json={"name": "big", "uploadToken": begun["uploadToken"]})
        assert_error(finish, 413, "limit")
    assert client.get("/v2/datasets").json()["count"] == 0
