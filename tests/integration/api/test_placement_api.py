"""Placement by memory over HTTP: a job lands on the smallest worker class it fits (with gradient
checkpointing turned on when that makes the fit), shows its estimate, or is refused with the numbers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests_support import assert_error

from app.db import FinetuningJob
from app.main import create_app

ROWS = b"".join(
    json.dumps({"prompt": f"Say {n}.", "completion": f" {n}"}).encode() + b"\n" for n in range(20)
)
# A Llama-3-8B-shaped config.json: an operator's local model (TUNEFORGE_EXTRA_BASE_MODELS).
LLAMA_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
}
CLASSES = [{"name": "h100", "memory_gib": 80}, {"name": "l4", "memory_gib": 22}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama-8b")
    (directory / "config.json").write_text(json.dumps(LLAMA_8B))
    return directory


@pytest.fixture(scope="module", params=["embedded", "postgres_s3"])
def placed_app(
    request: pytest.FixtureRequest,
    stack_settings_factory: Callable[..., Any],
    validate_worker_for: Callable[[Any], Any],
    model_dir: Path,
) -> Iterator[TestClient]:
    settings = stack_settings_factory(
        request.param, worker_classes=CLASSES, extra_base_models=[str(model_dir)]
    )
    validate_worker_for(settings)
    with TestClient(create_app(settings)) as client:
        yield client


def _create(tenant: Any, model_dir: Path, **params: Any) -> Any:
    body = {"params": {"base_model": str(model_dir), "train_steps": 3, **params}}
    return tenant.client.post("/v2/finetuning/jobs", json=body | {"dataset": "numbers", "repo": "numbers"})


@pytest.fixture
def tenant(placed_app: TestClient, new_tenant_on: Callable[[TestClient], Any]) -> Any:
    session = new_tenant_on(placed_app)
    assert session.upload_dataset("numbers", "numbers.jsonl", ROWS)["status"] == "connected"
    assert session.client.post("/v2/repos", json={"name": "numbers"}).status_code == 200
    return session


def test_a_job_goes_to_the_smallest_class_it_fits_and_shows_its_estimate(
    tenant: Any, model_dir: Path
) -> None:
    response = _create(tenant, model_dir, adapter="lora", quantization_bits=4, micro_batch_size=1,
                       max_seq_length=1024, gradient_checkpointing=True)  # fmt: skip
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["workerClass"], job["accelerator"]["id"]) == ("l4", "l4")
    estimate = job["placement"]["estimate"]
    assert 4 < estimate["total_gib"] < 22 and estimate["parts"]["base_weights"] > 0
    assert job["placement"]["gradient_checkpointing_turned_on"] is False


def test_checkpointing_is_turned_on_in_the_stored_params_when_that_makes_the_fit(
    tenant: Any, model_dir: Path, placed_app: TestClient
) -> None:
    # bf16 LoRA, 4 x 2048 tokens: ~110 GiB as asked, ~37 GiB checkpointed.
    response = _create(tenant, model_dir, adapter="lora")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["workerClass"] == "h100" and job["params"]["gradient_checkpointing"] is True
    assert job["placement"]["gradient_checkpointing_turned_on"] is True
    timeline = tenant.client.get(f"/v2/finetuning/jobs/{job['uuid']}/timeline").json()
    assert "gradient_checkpointing was turned on" in timeline["placement"]["detail"]
    version = tenant.client.get("/v2/repos/numbers/version/1").json()
    assert version["config"]["gradient_checkpointing"] is True  # what the worker will train with
    with placed_app.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        row = session.scalars(select(FinetuningJob).where(FinetuningJob.uuid == job["uuid"])).one()
        assert (row.worker_class, row.params["gradient_checkpointing"]) == ("h100", True)


def test_a_job_no_class_can_hold_is_refused_with_the_numbers(tenant: Any, model_dir: Path) -> None:
    response = _create(tenant, model_dir, adapter="full")
    body = assert_error(response, 422, "the largest worker class (h100) has 80 GiB per device")
    assert "needs ~" in body["error"] and "GiB per device" in body["error"]
    assert "`adapter: lora` with `quantization_bits: 4`" in body["error"]
    assert tenant.client.get("/v2/finetuning/jobs").json()["count"] == 0
