"""Hostile tenants against shared capacity: each per-tenant quota's 429, lost workers, orphaned blobs,
and a database outage under a live control plane and a training worker.

Each test plays one case of issue 15's "Fairness, quotas and lost work" and failed before its fix.
The serving quotas run against a real `tuneforge serve` (tiny-random-llama) that the control plane
reaches through TUNEFORGE_SERVING_URLS; workers are real `tuneforge worker` processes; the database
outage is a TCP proxy between them and the machine's PostgreSQL, cut and restored by the test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer
from sqlalchemy import make_url, select
from tcp_proxy import TcpProxy
from tests_support import assert_error, write_peft_adapter
from worker_fixtures import TEST_LEASE_SECONDS, WorkerStack, settings_env

from app.db import FinetuningJob

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"
ROWS = b"".join(
    json.dumps({"prompt": f"Repeat {n}.", "completion": f" {n} {n}"}).encode() + b"\n" for n in range(40)
)
FINAL = {"completed", "errored", "canceled"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Tenant:
    """A fresh tenant on a live server, with an httpx client carrying its token."""

    def __init__(self, server: LiveServer) -> None:
        self.name = f"t-{secrets.token_hex(4)}"
        self.token = server.mint_token(self.name)
        self.api = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )

    def upload(self, name: str, data: bytes = ROWS) -> httpx.Response:
        begun = self.api.post(
            "/v2/datasets/upload", json={"fileName": f"{name}.jsonl", "mimeType": "text/plain"}
        )
        if begun.status_code != 200:
            return begun
        httpx.put(begun.json()["presignedUrl"], content=data, timeout=60).raise_for_status()
        return self.api.put(
            "/v2/datasets/upload", json={"name": name, "uploadToken": begun.json()["uploadToken"]}
        )

    def connected_dataset(self, name: str) -> None:
        assert self.upload(name).status_code == 200
        _until(
            lambda: self.api.get(f"/v1/datasets/name/{name}").json()["status"] == "connected",
            30,
            f"dataset {name} to connect",
        )

    def create_job(self, **params: Any) -> httpx.Response:
        body = {"params": {"base_model": TINY, **params}, "dataset": "d", "repo": "r"}
        return self.api.post("/v2/finetuning/jobs", json=body)

    def job(self, uuid: str) -> dict[str, Any]:
        return dict(self.api.get(f"/v2/finetuning/jobs/{uuid}").json())

    def wait_for_attempt(self, uuid: str, attempt: int) -> None:
        _until(lambda: self.job(uuid)["attempt"] == attempt, 120, f"attempt {attempt} of job {uuid} to start")

    def finished(self, uuid: str, timeout: float) -> dict[str, Any]:
        """The job once it reached a final status."""
        _until(lambda: self.job(uuid)["status"] in FINAL, timeout, f"job {uuid} to reach a final status")
        return self.job(uuid)


# --- quotas ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving_url(
    stack_settings_factory: Callable[..., Any],
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real `tuneforge serve` for tiny-random-llama, started the way the supervisor starts one."""
    settings = stack_settings_factory("embedded", model_cache_dir=shared_model_cache)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _until(healthy, 120, "tuneforge serve to become healthy")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def proxy_server(
    stack_settings_factory: Callable[..., Any], serving_url: str, shared_model_cache: Path
) -> Iterator[Callable[..., LiveServer]]:
    """A live control plane whose tiny-random-llama deployments are served by `serving_url`."""
    opened: list[LiveServer] = []

    def build(**limits: Any) -> LiveServer:
        settings = stack_settings_factory(
            "embedded", serving_urls={TINY: serving_url}, model_cache_dir=shared_model_cache, **limits
        )
        server = LiveServer(settings).__enter__()
        opened.append(server)
        return server

    yield build
    for server in opened:
        server.__exit__(None, None, None)


def _deployed(server: LiveServer) -> Tenant:
    tenant = Tenant(server)
    created = tenant.api.post("/v2/deployments", json={"name": "tiny", "config": {"baseModel": TINY}})
    assert created.status_code == 200, created.text
    return tenant


def _proxy_path(tenant: Tenant, route: str) -> str:
    return f"/{tenant.name}/deployments/v2/llms/tiny/{route}"


def _generate(tenant: Tenant) -> httpx.Response:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    return tenant.api.post(_proxy_path(tenant, "generate"), json=body)


def test_a_tenant_past_its_active_jobs_gets_429_with_retry_after_and_another_tenant_does_not(
    stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any]
) -> None:
    settings = stack_settings_factory("postgres_s3", tenant_max_active_jobs=2)
    validate_worker_for(settings)
    with LiveServer(settings) as server:
        greedy, other = Tenant(server), Tenant(server)
        for tenant in (greedy, other):
            tenant.connected_dataset("d")
            assert tenant.api.post("/v2/repos", json={"name": "r"}).status_code == 200
        assert [greedy.create_job(train_steps=5).status_code for _ in range(2)] == [200, 200]

        refused = greedy.create_job(train_steps=5)

        assert_error(refused, 429, "too many fine-tuning jobs")
        assert int(refused.headers["Retry-After"]) > 0
        assert greedy.api.get("/v2/finetuning/jobs").json()["count"] == 2
        assert other.create_job(train_steps=5).status_code == 200


def test_a_tenant_holding_its_waiting_requests_gets_429_and_its_slot_back_when_it_leaves(
    proxy_server: Callable[..., LiveServer],
) -> None:
    server = proxy_server(tenant_max_waiting_requests=1)
    hog, other = _deployed(server), _deployed(server)
    limits = server.app.state.serving_limits
    assert _generate(hog).status_code == 200
    # Its slot goes back once the server has finished the response, which may be after the client
    # has read it: wait, so that the count below is the stalled request's alone.
    _until(lambda: limits.waiting(hog.name) == 0, 10, "the first request's slot to be given back")
    # A request whose body never finishes arriving stays in flight through the proxy.
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(
        f"POST {_proxy_path(hog, 'generate')} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hog.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
    )
    _until(lambda: limits.waiting(hog.name) == 1, 10, "the stalled request to be admitted")

    refused = _generate(hog)

    assert_error(refused, 429, "too many serving requests in flight")
    assert refused.headers["Retry-After"] == "1"
    assert _generate(other).status_code == 200
    stalled.close()  # the client leaves: its slot is given back
    _until(lambda: limits.waiting(hog.name) == 0, 10, "the slot of the departed client")
    assert _generate(hog).status_code == 200


def test_a_tenant_sending_faster_than_its_rate_gets_429_with_retry_after_and_another_tenant_does_not(
    proxy_server: Callable[..., LiveServer],
) -> None:
    server = proxy_server(tenant_requests_per_second=0.1, tenant_request_burst=2)
    flooder, other = _deployed(server), _deployed(server)
    assert [flooder.api.get(_proxy_path(flooder, "health")).status_code for _ in range(2)] == [200, 200]

    refused = flooder.api.get(_proxy_path(flooder, "health"))

    assert_error(refused, 429, "too many serving requests per second")
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    assert other.api.get(_proxy_path(other, "health")).status_code == 200
    assert _generate(other).status_code == 200


def test_a_tenant_at_its_stored_bytes_gets_429_for_uploads_and_jobs_and_another_tenant_does_not(
    stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any]
) -> None:
    settings = stack_settings_factory("postgres_s3", tenant_max_stored_bytes=len(ROWS))
    validate_worker_for(settings)
    with LiveServer(settings) as server:
        hoarder, other = Tenant(server), Tenant(server)
        hoarder.connected_dataset("d")
        assert hoarder.api.post("/v2/repos", json={"name": "r"}).status_code == 200

        for refused in (hoarder.upload("more"), hoarder.create_job(train_steps=5)):
            assert_error(refused, 429, "storage quota reached")
            assert int(refused.headers["Retry-After"]) > 0
        adapter = hoarder.api.post("/v2/adapters/upload", json={"repo": "r"})
        assert_error(adapter, 429, "storage quota reached")
        assert other.upload("d").status_code == 200


# --- lost work ---------------------------------------------------------------------------------------


def _worker_pid(stack: WorkerStack, uuid: str) -> int:
    """The pool child running the job: its pid ends the worker id it holds the lease under."""
    with stack.app.state.ctx.sessions() as session:
        worker_id = session.scalars(select(FinetuningJob.worker_id).where(FinetuningJob.uuid == uuid)).one()
    return int(worker_id.rsplit("/", 1)[1])


def test_a_job_whose_worker_is_killed_on_every_attempt_ends_errored_instead_of_being_redelivered(
    worker_stack_factory: Callable[..., WorkerStack],
) -> None:
    stack = worker_stack_factory("postgres_s3", job_max_attempts=2)
    stack.new_worker().start()
    tenant = Tenant(stack.server)
    tenant.connected_dataset("d")
    assert tenant.api.post("/v2/repos", json={"name": "r"}).status_code == 200
    uuid = tenant.create_job(train_steps=100_000, checkpoint_every_n_steps=5).json()["uuid"]

    for attempt in (1, 2):
        tenant.wait_for_attempt(uuid, attempt)
        # What the kernel's OOM killer does: the pool child dies at once; Celery's parent lives on.
        os.kill(_worker_pid(stack, uuid), signal.SIGKILL)

    final = tenant.finished(uuid, 60)
    assert (final["status"], final["error"]) == ("errored", "worker lost 2 times (out of memory?)")
    assert final["attempt"] == 2
    version = tenant.api.get("/v2/repos/r/version/1").json()
    assert version["status"] == "errored"


# --- orphaned blobs ----------------------------------------------------------------------------------


def _gc(settings: Any, *args: str) -> str:
    """`tuneforge gc ...` as an operator runs it, configured like the server; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "gc", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gc_removes_only_orphaned_blobs_after_a_dry_run_that_removes_nothing(
    stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any], tmp_path: Path
) -> None:
    # A stack of its own (any override builds one, with a bucket of its own): gc then sees only this
    # test's blobs, not what the rest of the suite leaves in the shared stack's bucket.
    settings = stack_settings_factory("postgres_s3", gc_min_age_seconds=86400.0)
    validate_worker_for(settings)
    with LiveServer(settings) as server:
        tenant = Tenant(server)
        store = server.app.state.ctx.store
        tenant.connected_dataset("live")
        adapter = write_peft_adapter(tmp_path / "adapter")
        begun = tenant.api.post("/v2/adapters/upload", json={"repo": "r"}).json()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            httpx.put(begun["presignedUrls"][name], content=(adapter / name).read_bytes()).raise_for_status()
        assert (
            tenant.api.put("/v2/adapters/upload", json={"uploadToken": begun["uploadToken"]}).status_code
            == 200
        )
        live = set(store.list_keys("tenants/"))
        # Orphans: a dataset upload never registered, an adapter upload never finished, bytes a crash
        # left after deleting a version's row, a cache entry of the earlier layout.
        abandoned = tenant.api.post(
            "/v2/datasets/upload", json={"fileName": "x.jsonl", "mimeType": "text/plain"}
        )
        httpx.put(abandoned.json()["presignedUrl"], content=ROWS).raise_for_status()
        staged = tenant.api.post("/v2/adapters/upload", json={"repo": "r"}).json()["presignedUrls"]
        httpx.put(staged["adapter_config.json"], content=b"{}").raise_for_status()
        tenant_dir = next(iter(live)).split("/")[1]
        crashed = f"tenants/{tenant_dir}/repos/gone/versions/v1/adapter_model.safetensors"
        store.put_stream(crashed, [b"w" * 1000])
        store.put_stream(f"tenants/{tenant_dir}/tokenized/old.safetensors", [b"t" * 10])
        store.put_stream("models/not-tenant-data.bin", [b"m"])
        orphans = set(store.list_keys("tenants/")) - live
        orphan_bytes = sum(store.stat(key).size for key in orphans)
        assert len(orphans) == 4

        assert "gc: would remove 0 orphan(s)" in _gc(settings, "--dry-run")  # all younger than a day
        dry = _gc(settings, "--dry-run", "--min-age-seconds", "0")
        assert f"would free {orphan_bytes} bytes" in dry and "nothing removed" in dry
        assert set(store.list_keys("tenants/")) == live | orphans
        report = _gc(settings, "--min-age-seconds", "0")

        assert f"gc: removed 4 orphan(s), 4 blob(s); freed {orphan_bytes} bytes" in report
        assert set(store.list_keys("tenants/")) == live
        assert store.exists("models/not-tenant-data.bin")
        assert tenant.api.get("/v2/repos/r/version/1/download").status_code == 200
        link = tenant.api.get("/v2/datasets/live/download-link").json()["url"]
        assert httpx.get(link).content == ROWS


# --- database outage ---------------------------------------------------------------------------------


def _through(proxy: TcpProxy, database_url: str) -> str:
    """`database_url` with its host and port replaced by the proxy's."""
    url = make_url(database_url)
    return url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def test_while_the_database_is_unreachable_the_api_answers_503_quickly_and_recovers_by_itself(
    stack_settings_factory: Callable[..., Any], fresh_postgres_url: str
) -> None:
    url = make_url(fresh_postgres_url)
    with TcpProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        settings = stack_settings_factory(
            "postgres_s3",
            database_url=_through(proxy, fresh_postgres_url),
            database_connect_timeout_seconds=1,
        )
        with LiveServer(settings) as server:
            tenant = Tenant(server)
            assert tenant.api.post("/v2/repos", json={"name": "before"}).status_code == 200

            proxy.cut()
            for method, path in (("GET", "/v2/repos"), ("POST", "/v2/repos"), ("GET", "/v2/finetuning/jobs")):
                started = time.monotonic()
                response = tenant.api.request(method, path, json={"name": "during"}, timeout=15)
                assert_error(response, 503, "the database is unreachable")
                assert response.headers["Retry-After"] == "5"
                assert time.monotonic() - started < 5, (
                    f"{method} {path} took {time.monotonic() - started:.1f} s"
                )
            proxy.restore()

            _until(lambda: tenant.api.get("/v2/repos").status_code == 200, 20, "the API to recover")
            assert tenant.api.post("/v2/repos", json={"name": "after"}).status_code == 200
            names = {repo["name"] for repo in tenant.api.get("/v2/repos").json()["data"]["repos"]}
            assert names == {"before", "after"}


def _enqueued_at(stack: WorkerStack, uuid: str) -> Any:
    with stack.app.state.ctx.sessions() as session:
        return session.scalars(select(FinetuningJob.enqueued_at).where(FinetuningJob.uuid == uuid)).one()


def test_a_worker_mid_job_keeps_its_job_through_a_database_outage_and_finishes_it(
    worker_stack_factory: Callable[..., WorkerStack], fresh_postgres_url: str
) -> None:
    url = make_url(fresh_postgres_url)
    with TcpProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        proxied = _through(proxy, fresh_postgres_url)
        stack = worker_stack_factory("postgres_s3", database_url=proxied, database_connect_timeout_seconds=1)
        worker = stack.new_worker().start()
        try:
            tenant = Tenant(stack.server)
            tenant.connected_dataset("d")
            assert tenant.api.post("/v2/repos", json={"name": "r"}).status_code == 200
            uuid = tenant.create_job(train_steps=20, checkpoint_every_n_steps=10).json()["uuid"]
            _until(lambda: tenant.job(uuid)["stepsDone"] >= 3, 120, "step 3")
            sent = _enqueued_at(stack, uuid)

            proxy.cut()
            time.sleep(TEST_LEASE_SECONDS + 2)  # the outage: a dozen steps' time, and past the job's lease
            proxy.restore()

            final = tenant.finished(uuid, 120)
            assert final["status"] == "completed", final["error"]
            assert (final["attempt"], final["stepsDone"]) == (1, 20)
            # Not re-sent either: the sweeper did not take the outage for a lost worker.
            assert _enqueued_at(stack, uuid) == sent
            metrics = tenant.api.get(f"/v2/finetuning/jobs/{uuid}/metrics").json()["data"]
            assert [row["step"] for row in metrics] == list(range(1, 21))
            assert b"database unreachable" in worker.log_path.read_bytes()  # the outage did hit its writes
        finally:
            worker.stop()
            stack.server.__exit__(None, None, None)
