"""Merged-model exports end to end on both stacks: `POST .../export` over HTTP (and through
`tuneforge adapters export --merged`), the `tuneforge.export` task on a real `tuneforge worker`
process, the zip downloaded and loaded with plain transformers."""

from __future__ import annotations

import io
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live_server import LiveServer
from peft import PeftModel
from tests_support import assert_error
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuneforge.cli import main
from version_artifacts import TINY, greedy, peft_adapter, publish, whole_model

from app.context import AppContext
from worker.training.base_models import resolve_base_model

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"


@dataclass
class Tenant:
    name: str
    token: str
    client: httpx.Client


@dataclass
class Stack:
    server: LiveServer
    base_dir: Path

    @property
    def ctx(self) -> AppContext:
        return self.server.app.state.ctx  # type: ignore[no-any-return]

    def tenant(self) -> Tenant:
        name = f"t-{secrets.token_hex(4)}"
        token = self.server.mint_token(name)
        client = httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        return Tenant(name, token, client)


@pytest.fixture
def stack(live_server_with_worker: Any, shared_model_cache: Path) -> Stack:
    """A live server and a real `tuneforge worker` process (which runs exports too), per stack."""
    return Stack(live_server_with_worker.server, resolve_base_model(TINY, shared_model_cache))


def _unzip(client: httpx.Client, path: str, dest: Path) -> Path:
    response = client.get(path)
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(dest)
    return dest


def test_a_lora_version_exports_as_a_plain_model_generating_as_the_adapter(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = stack.tenant()
    client = tenant.client
    artifact = peft_adapter(stack.base_dir, tmp_path / "lora")
    publish(stack.ctx, tenant.name, "acme", "lora", artifact)
    export = "/v2/repos/acme/version/1/export"
    assert_error(client.get(export + "/download"), 409, "ask for it with POST")

    started = client.post(export)
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("queued", "running")
    # The CLI asks again (the same export), waits for it and downloads the zip.
    argv = ["adapters", "export", "acme/1", "--merged", "--dest", str(tmp_path), "--timeout", "120"]
    assert main([*argv, "--url", stack.server.url, "--token", tenant.token]) == 0, capsys.readouterr().err
    zipped = tmp_path / "acme-1-merged.zip"
    assert str(zipped) in capsys.readouterr().out
    record = client.get(export).json()
    assert record["status"] == "completed", record
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        record["files"]
    )

    zipfile.ZipFile(zipped).extractall(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
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
    tenant = stack.tenant()
    client = tenant.client
    publish(stack.ctx, tenant.name, "whole", "full", whole_model(stack.base_dir, tmp_path / "full"))
    response = client.post("/v2/repos/whole/version/1/export")
    assert response.status_code == 200 and response.json()["status"] == "completed", response.text
    out = _unzip(client, "/v2/repos/whole/version/1/export/download", tmp_path / "out")
    assert "training_summary.json" not in {p.name for p in out.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_exports_of_unknown_unfinished_or_other_tenants_versions_are_refused(
    stack: Stack, tmp_path: Path
) -> None:
    tenant, other = stack.tenant(), stack.tenant()
    client, other_client = tenant.client, other.client
    publish(stack.ctx, tenant.name, "acme", "lora", peft_adapter(stack.base_dir, tmp_path / "lora"))
    publish(stack.ctx, tenant.name, "acme", "lora", tmp_path, status="training")
    assert_error(client.post("/v2/repos/acme/version/9/export"), 404, "acme/9 not found")
    assert_error(client.get("/v2/repos/nope/version/1/export"), 404, "not found")
    assert_error(client.post("/v2/repos/acme/version/2/export"), 409, "not completed")
    assert_error(client.post("/v2/repos/acme/version/x/export"), 422, "tag")
    assert_error(other_client.post("/v2/repos/acme/version/1/export"), 404, "not found")
    assert client.get("/v2/repos/acme/version/1/export").json()["status"] == "none"
