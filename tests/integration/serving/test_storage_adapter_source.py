"""StorageAdapterSource on both stacks: adapters uploaded through the API, fetched for the serving engine.

Versions and checkpoints are made the way users and workers make them (the upload flow over HTTP, a
job accepted over HTTP whose checkpoints are recorded through the same services the worker uses).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests_support import write_peft_adapter

from app.context import AppContext
from app.db import AdapterVersion, FinetuningJob, JobStatus, Repo, Tenant
from app.db.session import transaction
from app.main import create_app
from app.services import auth, jobs
from worker.serve_main import StorageAdapterSource
from worker.serving.errors import AdapterLoadError, AdapterNotFoundError

TINY = "tiny-random-llama"
ROWS = b"".join(
    json.dumps({"prompt": f"Say {n}.", "completion": f" {n}"}).encode() + b"\n" for n in range(20)
)


@pytest.fixture(scope="module", params=["embedded", "postgres_s3"])
def api(
    request: pytest.FixtureRequest, stack_settings_factory: Callable[..., Any], validate_worker_for: Any
) -> Iterator[TestClient]:
    settings = stack_settings_factory(request.param)
    validate_worker_for(settings)  # the checkpoint tests upload a dataset that must be connected
    with TestClient(create_app(settings)) as client:
        yield client


@dataclass
class TenantClient:
    client: TestClient
    name: str

    @property
    def ctx(self) -> AppContext:
        return self.client.app.state.ctx  # type: ignore[attr-defined,no-any-return]

    def put(self, url: str, data: bytes) -> None:
        # Local-store URLs point at the app itself; S3 URLs at the real S3 server.
        if url.startswith(str(self.client.base_url)):
            self.client.put(url, content=data).raise_for_status()
        else:
            httpx.put(url, content=data).raise_for_status()

    def upload_adapter(self, repo: str, directory: Path) -> dict[str, Any]:
        begun = self.client.post("/v2/adapters/upload", json={"repo": repo}).json()
        for path in directory.iterdir():
            self.put(begun["presignedUrls"][path.name], path.read_bytes())
        response = self.client.put("/v2/adapters/upload/", json={"uploadToken": begun["uploadToken"]})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def new_tenant(api: TestClient) -> Callable[[], TenantClient]:
    def make() -> TenantClient:
        name = f"t-{secrets.token_hex(4)}"
        with transaction(api.app.state.ctx.sessions) as session:  # type: ignore[attr-defined]
            token = auth.create_token(session, auth.get_or_create_user(session, name, "alice"))
        return TenantClient(TestClient(api.app, headers={"Authorization": f"Bearer {token}"}), name)

    return make


@pytest.fixture
def tenant(new_tenant: Callable[[], TenantClient]) -> TenantClient:
    return new_tenant()


def _source(tenant: TenantClient, tmp_path: Path, base_model: str = TINY) -> StorageAdapterSource:
    return StorageAdapterSource(tenant.ctx, tmp_path / "cache", tenant.name, base_model=base_model)


def _fetch(source: StorageAdapterSource, adapter_id: str, tenant: str | None) -> Path:
    """What the engine does: resolve the id (per request), then fetch what it resolved to (at load)."""
    return source.fetch(source.resolve(adapter_id, tenant))


def _adapter(tmp_path: Path, name: str = "adapter", base_model: str = TINY) -> Path:
    return write_peft_adapter(tmp_path / name, base_model)


def _version(tenant: TenantClient, repo: str, tag: int) -> AdapterVersion:
    with transaction(tenant.ctx.sessions) as session:
        query = (
            select(AdapterVersion)
            .join(Repo)
            .join(Tenant, Tenant.id == Repo.tenant_id)
            .where(Tenant.name == tenant.name, Repo.name == repo, AdapterVersion.tag == tag)
        )
        version = session.scalars(query).unique().one()
        session.expunge(version)
        return version


def test_an_uploaded_version_is_fetched_verified_and_cached(tenant: TenantClient, tmp_path: Path) -> None:
    directory = _adapter(tmp_path)
    tenant.upload_adapter("mine", directory)
    source = _source(tenant, tmp_path)

    fetched = _fetch(source, "mine/1", None)  # None: the source's default tenant
    assert sorted(p.name for p in fetched.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for path in fetched.iterdir():
        assert path.read_bytes() == (directory / path.name).read_bytes()
    assert fetched == tmp_path / "cache" / _version(tenant, "mine", 1).uuid
    # Cached: a second fetch reads nothing from storage, even once the blobs are gone.
    tenant.ctx.store.delete_prefix(_version(tenant, "mine", 1).artifact_prefix or "")
    assert _fetch(source, "mine/1", tenant.name) == fetched
    assert source.list_available(tenant.name) == ["mine/1"]


def test_another_tenants_or_an_unknown_adapter_is_not_found(
    tenant: TenantClient, new_tenant: Callable[[], TenantClient], tmp_path: Path
) -> None:
    tenant.upload_adapter("mine", _adapter(tmp_path))
    other = new_tenant()
    with pytest.raises(AdapterNotFoundError, match="mine/1 not found"):
        _fetch(_source(tenant, tmp_path), "mine/1", other.name)
    for unknown in ("mine/2", "theirs/1", "mine", "mine/1@3"):
        with pytest.raises(AdapterNotFoundError):
            _fetch(_source(tenant, tmp_path), unknown, tenant.name)
    assert _source(tenant, tmp_path).list_available(other.name) == []


def test_an_adapter_of_another_base_model_is_a_load_error_naming_both(
    tenant: TenantClient, tmp_path: Path
) -> None:
    tenant.upload_adapter("smol", _adapter(tmp_path, base_model="smollm2-135m"))
    with pytest.raises(
        AdapterLoadError, match=r"trained on 'smollm2-135m'; this deployment serves 'tiny-random-llama'"
    ):
        _fetch(_source(tenant, tmp_path), "smol/1", tenant.name)
    assert _source(tenant, tmp_path).list_available(tenant.name) == []
    assert _source(tenant, tmp_path, base_model="smollm2-135m").list_available(tenant.name) == ["smol/1"]


def test_corrupted_blobs_and_pickle_only_versions_are_load_errors(
    tenant: TenantClient, tmp_path: Path
) -> None:
    tenant.upload_adapter("mine", _adapter(tmp_path))
    version = _version(tenant, "mine", 1)
    tenant.ctx.store.put_stream(f"{version.artifact_prefix}adapter_model.safetensors", [b"not the weights"])
    with pytest.raises(AdapterLoadError, match="cannot read its files"):
        _fetch(_source(tenant, tmp_path), "mine/1", tenant.name)
    assert not (tmp_path / "cache" / version.uuid).exists()  # nothing half-written is left to serve

    with transaction(tenant.ctx.sessions) as session:
        row = session.get(AdapterVersion, version.id)
        assert row is not None
        files = dict(row.artifact_files)
        files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
        row.artifact_files = files
    with pytest.raises(AdapterLoadError, match=r"only pickled weights \(adapter_model.bin\)"):
        _fetch(_source(tenant, tmp_path), "mine/1", tenant.name)


def test_a_turbo_versions_speculator_heads_are_fetched_with_its_adapter(
    tenant: TenantClient, tmp_path: Path
) -> None:
    from worker.job_io import upload_dir

    directory = _adapter(tmp_path)
    tenant.upload_adapter("turbo", directory)
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "speculator.safetensors").write_bytes(b"head weights")
    (heads / "speculator_config.json").write_text('{"num_heads": 3}')
    version = _version(tenant, "turbo", 1)
    with transaction(tenant.ctx.sessions) as session:  # as the worker records a turbo_lora's artifacts
        row = session.get(AdapterVersion, version.id)
        assert row is not None
        stored = upload_dir(tenant.ctx.store, heads, row.artifact_prefix or "")
        row.artifact_files = {**row.artifact_files, **stored}

    fetched = _fetch(_source(tenant, tmp_path), "turbo/1", tenant.name)
    assert sorted(p.name for p in fetched.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "speculator.safetensors",
        "speculator_config.json",
    ]
    assert (fetched / "speculator.safetensors").read_bytes() == b"head weights"


def _job_with_checkpoints(tenant: TenantClient, checkpoint_dir: Path, steps: list[int]) -> str:
    """numbers/1: a job accepted over HTTP, training, with the adapter stored as a checkpoint at `steps`."""
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": "n.jsonl", "mimeType": "text/plain"})
    tenant.put(begun.json()["presignedUrl"], ROWS)
    tenant.client.put(
        "/v2/datasets/upload", json={"name": "numbers", "uploadToken": begun.json()["uploadToken"]}
    )
    for _ in range(200):
        if tenant.client.get("/v1/datasets/name/numbers").json()["status"] != "validating":
            break
        time.sleep(0.05)
    tenant.client.post("/v2/repos", json={"name": "numbers"})
    body = {"params": {"base_model": TINY, "train_steps": 30}, "dataset": "numbers", "repo": "numbers"}
    response = tenant.client.post("/v2/finetuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job_uuid: str = response.json()["uuid"]
    files = {p.name: p.read_bytes() for p in checkpoint_dir.iterdir()} | {"trainer/state.json": b"{}"}
    with transaction(tenant.ctx.sessions) as session:
        job = session.scalars(select(FinetuningJob).where(FinetuningJob.uuid == job_uuid)).one()
        jobs.transition(session, job, JobStatus.TRAINING)
        for step in steps:
            prefix = f"tests/{job_uuid}/checkpoints/step-{step}/"
            stored = {}
            for name, data in files.items():
                tenant.ctx.store.put_stream(f"{prefix}{name}", [data])
                stored[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            jobs.record_checkpoint(session, job, step, prefix, stored)
    return job_uuid


def test_a_checkpoint_is_served_by_step_without_its_trainer_state(
    tenant: TenantClient, tmp_path: Path
) -> None:
    directory = _adapter(tmp_path)
    _job_with_checkpoints(tenant, directory, [10, 20])
    source = _source(tenant, tmp_path)
    with pytest.raises(AdapterLoadError, match="numbers/1 is training, not completed"):
        _fetch(source, "numbers/1", tenant.name)
    with pytest.raises(AdapterNotFoundError, match="stored checkpoint steps are 10, 20"):
        _fetch(source, "numbers/1@15", tenant.name)

    fetched = _fetch(source, "numbers/1@20", tenant.name)
    assert fetched == tmp_path / "cache" / _version(tenant, "numbers", 1).uuid / "step-20"
    assert sorted(p.name for p in fetched.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert source.list_available(tenant.name) == []  # only completed versions are listed


def test_the_server_serves_a_stored_adapter_in_the_tenant_the_proxy_signs_for(
    tenant: TenantClient, new_tenant: Callable[[], TenantClient], tmp_path: Path, shared_model_cache: Path
) -> None:
    from tuneforge.serving_auth import TenantAssertions

    from worker.serving.async_engine import AsyncEngine
    from worker.serving.engine import EngineConfig
    from worker.serving.server import build_app
    from worker.serving.tenant_auth import SignedTenants

    tenant.upload_adapter("mine", _adapter(tmp_path))
    other = new_tenant().name
    config = EngineConfig(model_path=shared_model_cache / TINY, model_name=TINY, kv_cache_bytes=1 << 24)
    engine = AsyncEngine(config, source=_source(tenant, tmp_path))
    engine.start()
    body = json.dumps(
        {"inputs": "Hello", "parameters": {"adapter_id": "mine/1", "max_new_tokens": 4, "details": True}}
    ).encode()
    assertions = TenantAssertions("s" * 48)

    def as_tenant(name: str, method: str, path: str, content: bytes = b"") -> dict[str, str]:
        return assertions.headers(tenant=name, method=method, path=path, body=content)

    def generate(server: TestClient, name: str) -> httpx.Response:
        headers = as_tenant(name, "POST", "/generate", body) | {"Content-Type": "application/json"}
        return server.post("/generate", content=body, headers=headers)

    def models(server: TestClient, name: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = server.get(
            "/v1/models", headers=as_tenant(name, "GET", "/v1/models")
        ).json()["data"]
        return listed

    try:
        with TestClient(build_app(engine, tenants=SignedTenants(assertions))) as server:
            mine = generate(server, tenant.name)
            assert mine.status_code == 200, mine.text
            assert engine.loaded_adapters(tenant.name) == ["mine/1"]
            assert engine.loaded_adapters(other) == []
            refused = generate(server, other)
            assert refused.status_code == 404 and "mine/1 not found" in refused.json()["error"]
            listed = models(server, tenant.name)
            assert [m["id"] for m in listed] == [TINY, "mine/1"] and listed[1]["loaded"] is True
            assert [m["id"] for m in models(server, other)] == [TINY]
    finally:
        engine.shutdown()


def test_turbo_heads_without_a_lora_are_served_and_pickles_never() -> None:
    from worker.serve_main import _adapter_files

    meta = {"sha256": "0" * 64}
    heads = {"speculator.safetensors": meta, "speculator_config.json": meta}
    # `turbo` on the base model: the heads are the whole artifact.
    assert _adapter_files("r/1", heads | {"training_summary.json": meta}) == heads
    peft = {"adapter_config.json": meta, "adapter_model.safetensors": meta}
    assert _adapter_files("r/2", peft | heads) == peft | heads
    with pytest.raises(AdapterLoadError, match="only pickled weights"):
        _adapter_files("r/3", heads | {"adapter_config.json": meta, "adapter_model.bin": meta})
    with pytest.raises(AdapterLoadError, match="no adapter weights"):
        _adapter_files("r/4", {"speculator_config.json": meta})


def test_an_id_resolves_to_its_versions_uuid_and_stops_resolving_once_archived_or_deleted(
    tenant: TenantClient, tmp_path: Path
) -> None:
    tenant.upload_adapter("mine", _adapter(tmp_path))
    source = _source(tenant, tmp_path)
    first = source.resolve("mine/1", tenant.name)
    assert first.key == _version(tenant, "mine", 1).uuid and first.adapter_id == "mine/1"

    assert tenant.client.put("/v2/repos/mine/version/1", json={"archived": True}).status_code == 200
    with pytest.raises(AdapterNotFoundError, match="archived"):
        source.resolve("mine/1", tenant.name)
    assert source.list_available(tenant.name) == []
    assert tenant.client.put("/v2/repos/mine/version/1", json={"archived": False}).status_code == 200
    assert source.resolve("mine/1", tenant.name).key == first.key

    assert tenant.client.delete("/v2/repos/mine").status_code in (200, 204)
    with pytest.raises(AdapterNotFoundError):
        source.resolve("mine/1", tenant.name)
    tenant.upload_adapter("mine", _adapter(tmp_path, "again"))  # a new repo of the same name: mine/1 again
    again = source.resolve("mine/1", tenant.name)
    assert again.key != first.key and again.key == _version(tenant, "mine", 1).uuid
    assert source.fetch(again) == tmp_path / "cache" / again.key


def test_the_engine_resolves_ids_again_after_a_couple_of_seconds_at_most(
    tenant: TenantClient, tmp_path: Path, shared_model_cache: Path
) -> None:
    from worker.serving.engine import EngineConfig, LLMEngine

    tenant.upload_adapter("mine", _adapter(tmp_path))
    config = EngineConfig(
        model_path=shared_model_cache / TINY,
        model_name=TINY,
        kv_cache_bytes=1 << 24,
        adapter_resolve_ttl_s=0.3,
    )
    cache = LLMEngine(config, _source(tenant, tmp_path)).adapters
    remembered = cache.resolve("mine/1", tenant.name)
    assert tenant.client.delete("/v2/repos/mine/version/1").status_code in (200, 204)
    assert cache.resolve("mine/1", tenant.name) == remembered  # within the TTL: no database read
    deadline = time.monotonic() + 5
    while True:
        try:
            cache.resolve("mine/1", tenant.name)
        except AdapterNotFoundError:
            break
        assert time.monotonic() < deadline, "a deleted version still resolves"
        time.sleep(0.05)
