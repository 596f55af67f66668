"""Merged-model exports end to end on Postgres, S3 and Redis: `POST .../export` over the API, the
`tuneforge.export` task on a real Celery worker, the zip downloaded and loaded with plain transformers."""

from __future__ import annotations

import io
import secrets
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from peft import PeftModel
from tests_support import assert_error
from transformers import AutoModelForCausalLM, AutoTokenizer
from version_artifacts import TINY, greedy, peft_adapter, publish, whole_model

from app.context import AppContext
from app.db.session import transaction
from app.main import create_app
from app.services import auth
from worker.celery_app import make_celery
from worker.tasks import register_tasks
from worker.training.base_models import resolve_base_model

pytestmark = pytest.mark.integration

EXPORT_TIMEOUT_S = 120
PROMPT = "The quick brown fox"


@dataclass
class Stack:
    api: TestClient
    base_dir: Path

    @property
    def ctx(self) -> AppContext:
        return self.api.app.state.ctx  # type: ignore[attr-defined,no-any-return]

    def tenant(self) -> tuple[str, TestClient]:
        name = f"t-{secrets.token_hex(4)}"
        with transaction(self.ctx.sessions) as session:
            token = auth.create_token(session, auth.get_or_create_user(session, name, "alice"))
        return name, TestClient(self.api.app, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def stack(stack_settings_factory: Callable[..., Any], shared_model_cache: Path) -> Iterator[Stack]:
    settings = stack_settings_factory("postgres_s3", model_cache_dir=shared_model_cache)
    with TestClient(create_app(settings)) as api:
        celery = make_celery(settings)  # the train queue: this stack's own (stack_settings_factory)
        register_tasks(celery, api.app.state.ctx)  # type: ignore[attr-defined]
        with start_worker(celery, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            yield Stack(api, resolve_base_model(TINY, shared_model_cache))


def _wait_for_export(client: TestClient, path: str) -> dict[str, Any]:
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        record: dict[str, Any] = client.get(path).json()
        if record["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return record
        time.sleep(0.1)


def _unzip(client: TestClient, path: str, dest: Path) -> Path:
    response = client.get(path)
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(dest)
    return dest


def test_a_lora_version_exports_as_a_plain_model_generating_as_the_adapter(
    stack: Stack, tmp_path: Path
) -> None:
    tenant, client = stack.tenant()
    artifact = peft_adapter(stack.base_dir, tmp_path / "lora")
    publish(stack.ctx, tenant, "acme", "lora", artifact)
    export = "/v2/repos/acme/version/1/export"
    assert_error(client.get(export + "/download"), 409, "ask for it with POST")

    started = client.post(export)
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("queued", "running", "completed")
    record = _wait_for_export(client, export)
    assert record["status"] == "completed", record
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        record["files"]
    )

    merged = AutoModelForCausalLM.from_pretrained(_unzip(client, export + "/download", tmp_path / "merged"))
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(stack.base_dir, dtype=torch.float32), artifact
    )
    prompt = AutoTokenizer.from_pretrained(stack.base_dir)(PROMPT)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(stack.base_dir, dtype=torch.float32)
    assert greedy(adapter, prompt, 10) != greedy(base, prompt, 10), "the adapter must change the output"
    assert greedy(merged, prompt, 10) == greedy(adapter, prompt, 10)
    # Kept: asking again answers the same export, at once.
    again = client.post(export)
    assert again.status_code == 200 and again.json()["files"] == record["files"]


def test_a_full_version_exports_its_own_model_at_once(stack: Stack, tmp_path: Path) -> None:
    tenant, client = stack.tenant()
    publish(stack.ctx, tenant, "whole", "full", whole_model(stack.base_dir, tmp_path / "full"))
    response = client.post("/v2/repos/whole/version/1/export")
    assert response.status_code == 200 and response.json()["status"] == "completed", response.text
    out = _unzip(client, "/v2/repos/whole/version/1/export/download", tmp_path / "out")
    assert "training_summary.json" not in {p.name for p in out.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_exports_of_unknown_unfinished_or_other_tenants_versions_are_refused(
    stack: Stack, tmp_path: Path
) -> None:
    tenant, client = stack.tenant()
    other, other_client = stack.tenant()
    publish(stack.ctx, tenant, "acme", "lora", peft_adapter(stack.base_dir, tmp_path / "lora"))
    publish(stack.ctx, tenant, "acme", "lora", tmp_path, status="training")
    assert_error(client.post("/v2/repos/acme/version/9/export"), 404, "acme/9 not found")
    assert_error(client.get("/v2/repos/nope/version/1/export"), 404, "not found")
    assert_error(client.post("/v2/repos/acme/version/2/export"), 409, "not completed")
    assert_error(client.post("/v2/repos/acme/version/x/export"), 422, "tag")
    assert_error(other_client.post("/v2/repos/acme/version/1/export"), 404, "not found")
    assert client.get("/v2/repos/acme/version/1/export").json()["status"] == "none"
