"""Per-tenant job and storage limits over HTTP on both stacks: race-safe, freed by cancel and delete."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from live_server import LiveServer
from tests_support import assert_error

ROWS = b"".join(
    json.dumps({"prompt": f"Say {n}.", "completion": f" {n}"}).encode() + b"\n" for n in range(20)
)
MAX_JOBS = 3
# Room for two uploads of ROWS (they are registered while the tenant is under the limit), not three.
MAX_BYTES = len(ROWS) + 1


@pytest.fixture(scope="module", params=["embedded", "postgres_s3"])
def server(
    request: pytest.FixtureRequest,
    stack_settings_factory: Callable[..., Any],
    validate_worker_for: Callable[[Any], Any],
) -> Iterator[LiveServer]:
    settings = stack_settings_factory(
        request.param, tenant_max_active_jobs=MAX_JOBS, tenant_max_stored_bytes=MAX_BYTES
    )
    validate_worker_for(settings)  # datasets reach a verdict on a real validate worker, as deployed
    with LiveServer(settings) as live:
        yield live


def _client(server: LiveServer) -> httpx.Client:
    token = server.mint_token(f"t-{secrets.token_hex(4)}")
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _upload(api: httpx.Client, name: str) -> httpx.Response:
    begun = api.post("/v2/datasets/upload", json={"fileName": f"{name}.jsonl", "mimeType": "text/plain"})
    if begun.status_code != 200:
        return begun
    httpx.put(begun.json()["presignedUrl"], content=ROWS).raise_for_status()
    return api.put("/v2/datasets/upload", json={"name": name, "uploadToken": begun.json()["uploadToken"]})


def _connected(api: httpx.Client, name: str) -> None:
    assert _upload(api, name).status_code == 200
    deadline = time.monotonic() + 30
    while api.get(f"/v1/datasets/name/{name}").json()["status"] != "connected":
        assert time.monotonic() < deadline, f"dataset {name} never connected"
        time.sleep(0.05)


def _create_job(api: httpx.Client) -> httpx.Response:
    body = {"params": {"base_model": "tiny-random-llama", "train_steps": 3}, "dataset": "d", "repo": "r"}
    return api.post("/v2/finetuning/jobs", json=body)


def test_concurrent_job_creations_never_pass_the_tenants_limit(server: LiveServer) -> None:
    api = _client(server)
    _connected(api, "d")
    assert api.post("/v2/repos", json={"name": "r"}).status_code == 200

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: _create_job(api), range(8)))

    assert statuses == [200] * MAX_JOBS + [429] * (8 - MAX_JOBS)
    assert api.get("/v2/finetuning/jobs").json()["count"] == MAX_JOBS
    refused = assert_error(_create_job(api), 429, "too many fine-tuning jobs")
    assert refused == {"error": refused["error"]}
    first = api.get("/v2/finetuning/jobs").json()["data"][0]["uuid"]
    assert api.post(f"/v2/finetuning/jobs/{first}/cancel").status_code == 200
    assert _create_job(api).status_code == 200  # a canceled job frees its slot


def test_uploads_and_jobs_are_refused_once_the_tenant_stores_its_quota_until_it_deletes(
    server: LiveServer,
) -> None:
    api, other = _client(server), _client(server)
    _connected(api, "d")
    assert api.post("/v2/repos", json={"name": "r"}).status_code == 200
    _connected(api, "second")  # registered while under the limit: now past it

    response = _upload(api, "third")
    assert_error(response, 429, "storage quota reached")
    assert int(response.headers["Retry-After"]) > 0
    assert_error(_create_job(api), 429, "storage quota reached")
    assert _upload(other, "d").status_code == 200  # another tenant's bytes are its own

    assert api.delete("/v2/datasets/second").status_code == 200
    assert _create_job(api).status_code == 200
