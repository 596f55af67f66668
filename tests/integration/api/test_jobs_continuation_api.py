"""Jobs that continue from an adapter version (`continueFromVersion`) on both stacks, without a worker.

Parents are made the way users make them (an uploaded PEFT adapter, a job accepted over HTTP); a
job's progress (status, checkpoints, artifact) is written through the same services the worker uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tests_support import assert_error, write_peft_adapter

from app.db import AdapterVersion, FinetuningJob, JobStatus, Repo, Tenant
from app.db.session import transaction
from app.services import jobs, versions

ROWS = b"".join(
    json.dumps({"prompt": f"Say {n}.", "completion": f" {n}"}).encode() + b"\n" for n in range(20)
)
TINY = "tiny-random-llama"
MODEL_FILES = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"weights"}


def _ready(tenant) -> None:  # type: ignore[no-untyped-def]
    assert tenant.upload_dataset("numbers", "numbers.jsonl", ROWS)["status"] == "connected"
    tenant.client.post("/v2/repos", json={"name": "numbers"})


def _create(tenant, params: dict[str, Any], parent: str | None = None, repo: str = "numbers"):  # type: ignore[no-untyped-def]
    body = {"params": params, "dataset": "numbers", "repo": repo, "continueFromVersion": parent}
    return tenant.client.post("/v2/finetuning/jobs", json=body)


def _upload_parent(tenant, tmp_path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """numbers/1: a rank-4 LoRA adapter of tiny-random-llama, uploaded through the SDK's flow."""
    directory = write_peft_adapter(tmp_path / "adapter", rank=4)
    begun = tenant.client.post("/v2/adapters/upload", json={"repo": "numbers"}).json()
    for path in directory.iterdir():
        tenant.put_presigned(begun["presignedUrls"][path.name], path.read_bytes()).raise_for_status()
    response = tenant.client.put("/v2/adapters/upload/", json={"uploadToken": begun["uploadToken"]})
    assert response.status_code == 200, response.text
    return response.json()


def _ctx(tenant):  # type: ignore[no-untyped-def]
    return tenant.client.app.state.ctx


def _store(ctx, prefix: str, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    for name, data in files.items():
        ctx.store.put_stream(f"{prefix}{name}", [data])
    return {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }


def _job(session, job_uuid: str) -> FinetuningJob:  # type: ignore[no-untyped-def]
    return session.scalars(select(FinetuningJob).where(FinetuningJob.uuid == job_uuid)).one()


def _version(session, tenant, tag: int) -> AdapterVersion:  # type: ignore[no-untyped-def]
    """numbers/`tag` of this test's tenant (every test has a repo of that name)."""
    query = (
        select(AdapterVersion)
        .join(Repo)
        .join(Tenant, Tenant.id == Repo.tenant_id)
        .where(Tenant.name == tenant.tenant, Repo.name == "numbers", AdapterVersion.tag == tag)
    )
    return session.scalars(query).unique().one()


def _train(
    tenant, job_uuid: str, *, checkpoints: dict[int, dict[str, bytes]], complete: bool = False
) -> None:  # type: ignore[no-untyped-def]
    """What a worker records: training, checkpoints at the given steps, and optionally the artifact."""
    ctx = _ctx(tenant)
    with transaction(ctx.sessions) as session:
        job = _job(session, job_uuid)
        jobs.transition(session, job, JobStatus.TRAINING)
        for step, files in checkpoints.items():
            prefix = f"tests/{job_uuid}/checkpoints/step-{step}/"
            jobs.record_checkpoint(session, job, step, prefix, _store(ctx, prefix, files))
        if complete:
            prefix = f"tests/{job_uuid}/artifact/"
            summary = {"training_summary.json": b'{"steps": 3}'}
            job.version.artifact_files = _store(ctx, prefix, MODEL_FILES | summary)
            job.version.artifact_prefix = prefix
            jobs.transition(session, job, JobStatus.COMPLETED)


def test_continuing_an_uploaded_adapter_inherits_its_model_rank_and_targets(tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parent = _upload_parent(tenant, tmp_path)
    _ready(tenant)
    response = _create(tenant, {"train_steps": 2, "learning_rate": 1e-3}, parent="numbers/1")
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["baseModel"], job["continueFromVersion"], job["targetVersionTag"]) == (TINY, "numbers/1", 2)
    params = job["params"]
    assert (params["adapter"], params["rank"], params["lora_alpha"]) == ("lora", 4, 8)
    assert (params["target_modules"], params["train_steps"], params["learning_rate"]) == (
        ["q_proj", "v_proj"],
        2,
        1e-3,
    )
    version = tenant.client.get("/v2/repos/numbers/version/2").json()
    assert (version["parentVersion"], version["baseModel"], version["status"]) == (
        "numbers/1",
        TINY,
        "queued",
    )
    with transaction(_ctx(tenant).sessions) as session:
        prefix, files = versions.parent_artifact(session, _version(session, tenant, 2)) or ("", {})
    assert (prefix, files) == (_version_prefix(tenant, 1), parent["artifactFiles"])
    # The queued run still needs its parent's files.
    assert_error(tenant.client.delete("/v2/repos/numbers/version/1"), 409, "parent of numbers/2")
    tenant.client.post(f"/v2/finetuning/jobs/{job['uuid']}/cancel")
    assert tenant.client.delete("/v2/repos/numbers/version/1").status_code == 200
    assert tenant.client.get("/v2/repos/numbers/version/2").json()["parentVersion"] is None


def _version_prefix(tenant, tag: int) -> str:  # type: ignore[no-untyped-def]
    with transaction(_ctx(tenant).sessions) as session:
        prefix = _version(session, tenant, tag).artifact_prefix
    assert prefix is not None
    return prefix


def test_continuing_a_trained_version_takes_its_config_where_the_request_is_silent(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    first = {"base_model": TINY, "rank": 8, "learning_rate": 1e-3, "lr_scheduler": "cosine", "train_steps": 3}
    parent_uuid = _create(tenant, first).json()["uuid"]
    _train(tenant, parent_uuid, checkpoints={}, complete=True)
    response = _create(
        tenant, {"train_steps": 5, "lora_dropout": 0.1, "base_model": None}, parent="numbers/1"
    )
    assert response.status_code == 200, response.text
    params = response.json()["params"]
    assert (params["rank"], params["lora_alpha"], params["learning_rate"]) == (8, 16, 1e-3)
    assert (params["lr_scheduler"]["type"], params["train_steps"], params["lora_dropout"]) == (
        "cosine",
        5,
        0.1,
    )
    # A completed version downloads everything its worker stored, the training summary included.
    download = tenant.client.get("/v2/repos/numbers/version/1/download")
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert set(archive.namelist()) == {*MODEL_FILES, "training_summary.json"}


def test_continuing_from_a_checkpoint_uses_its_model_files_and_not_its_trainer_state(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    parent_uuid = _create(tenant, {"base_model": TINY, "train_steps": 30}).json()["uuid"]
    checkpoint = MODEL_FILES | {"trainer/optimizer.pt": b"moments", "trainer/state.json": b"{}"}
    _train(tenant, parent_uuid, checkpoints={10: checkpoint, 20: checkpoint})
    assert_error(_create(tenant, {}, parent="numbers/1"), 422, "numbers/1 is training, not completed")
    assert_error(
        _create(tenant, {}, parent="numbers/1@15"), 404, "no checkpoint at step 15; available steps: 10, 20"
    )

    response = _create(tenant, {"train_steps": 4}, parent="numbers/1@10")
    assert response.status_code == 200, response.text
    assert response.json()["continueFromVersion"] == "numbers/1@10"
    assert tenant.client.get("/v2/repos/numbers/version/2").json()["parentVersion"] == "numbers/1@10"
    with transaction(_ctx(tenant).sessions) as session:
        child = _version(session, tenant, 2)
        prefix, files = versions.parent_artifact(session, child) or ("", {})
        assert prefix.endswith("/step-10/") and set(files) == set(MODEL_FILES)
        # The parent's job prunes step 10 as it trains on: the child can no longer start from it.
        later = f"tests/{parent_uuid}/checkpoints/step-30/"
        jobs.record_checkpoint(
            session, _job(session, parent_uuid), 30, later, _store(_ctx(tenant), later, checkpoint)
        )
        assert jobs.prune_checkpoints(session, _job(session, parent_uuid), 2) == [prefix]
        with pytest.raises(versions.ParentMissingError, match=r"numbers/1@10, which no longer exists"):
            versions.parent_artifact(session, child)

    # A job stopped short downloads its last checkpoint's model, without the trainer state.
    tenant.client.post(f"/v2/finetuning/jobs/{parent_uuid}/cancel")
    with transaction(_ctx(tenant).sessions) as session:
        jobs.transition(session, _job(session, parent_uuid), JobStatus.CANCELED)
    with zipfile.ZipFile(io.BytesIO(tenant.client.get("/v2/repos/numbers/version/1/download").content)) as zf:
        assert set(zf.namelist()) == set(MODEL_FILES)


def test_a_changed_base_model_or_adapter_is_a_422_naming_the_field(tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _upload_parent(tenant, tmp_path)
    _ready(tenant)
    assert_error(
        _create(tenant, {"base_model": "smollm2-135m"}, parent="numbers/1"),
        422,
        f"params.base_model: continuing from numbers/1 (trained on '{TINY}') trains '{TINY}', "
        "not 'smollm2-135m'",
    )
    assert_error(
        _create(tenant, {"adapter": "dora"}, parent="numbers/1"),
        422,
        "params.adapter: continuing from numbers/1 (a 'lora' version) trains 'lora', not 'dora'",
    )
    # The parent's config merged with the request is validated like any other.
    assert_error(_create(tenant, {"rank": 0}, parent="numbers/1"), 422, "params.rank: rank must be between")
    assert_error(_create(tenant, {}, parent="numbers/1@3"), 404, "numbers/1 was uploaded, not trained")
    assert tenant.client.get("/v2/finetuning/jobs").json()["count"] == 0  # nothing half-created


def test_turbo_trains_heads_on_a_lora_version_with_the_turbo_learning_rate(tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _upload_parent(tenant, tmp_path)
    _ready(tenant)
    response = _create(tenant, {"adapter": "turbo", "speculator_heads": 4}, parent="numbers/1")
    assert response.status_code == 200, response.text
    params = response.json()["params"]
    assert (params["adapter"], params["rank"], params["speculator_heads"]) == ("turbo", 4, 4)
    assert params["learning_rate"] == 1e-3  # not the parent's LoRA rate
    assert tenant.client.get("/v2/repos/numbers/version/2").json()["parentVersion"] == "numbers/1"
    assert_error(
        _create(tenant, {"adapter": "turbo_lora"}, parent="numbers/1"),
        422,
        "params.adapter: continuing from numbers/1 (a 'lora' version) trains 'lora', not 'turbo_lora'",
    )


def test_another_tenants_version_cannot_be_continued(tenant, other_tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _upload_parent(tenant, tmp_path)
    _ready(other_tenant)
    for parent in ("numbers/1", "numbers/1@10"):
        assert_error(_create(other_tenant, {"train_steps": 2}, parent=parent), 404, "numbers/1 not found")
    assert other_tenant.client.get("/v2/finetuning/jobs").json()["count"] == 0


def test_a_repo_holding_the_parent_of_a_queued_run_cannot_be_deleted(tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _upload_parent(tenant, tmp_path)
    _ready(tenant)
    tenant.client.post("/v2/repos", json={"name": "next"})
    job = _create(tenant, {"train_steps": 2}, parent="numbers/1", repo="next")
    assert job.status_code == 200, job.text
    assert_error(
        tenant.client.delete("/v2/repos/numbers"), 409, "holds the parent of next/1, which is still queued"
    )
    tenant.client.post(f"/v2/finetuning/jobs/{job.json()['uuid']}/cancel")
    assert tenant.client.delete("/v2/repos/numbers").status_code == 200
