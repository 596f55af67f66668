"""Base models beyond the built-ins, end to end: a model in an HF cache named by its hub id, and a model
imported into the model store (S3) and fetched into a fresh model cache, each trained by a real worker
and served through the control plane's proxy to the real Predibase SDK."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from model_dirs import lay_out_hf_cache
from model_store_support import COMMIT, HUB_ID, build_tiny_llama
from peft import PeftModel
from predibase import FinetuningConfig, Predibase
from predibase.config import DeploymentConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from worker_fixtures import WorkerStack, settings_env

pytestmark = pytest.mark.e2e

ROWS = [{"prompt": f"Say {n} twice.", "completion": f" {n} {n}"} for n in range(24)]
PROMPT = "Say 7 twice."


def _sdk(stack: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Predibase, str]:
    token = stack.mint_token(f"t-{time.monotonic_ns()}")
    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", token)
    pb = Predibase()
    data = tmp_path / "twice.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    pb.datasets.from_file(data, name="twice")
    pb.repos.create(name="twice", exists_ok=True)
    return pb, token


def _peft_greedy(base_dir: Path, archive: Path, out: Path, new_tokens: int) -> str:
    """What HF + PEFT generate greedily with the trained adapter on the model's own files."""
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(out)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out
    )
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return str(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))


def _train_and_serve(pb: Predibase, stack: WorkerStack, base_model: str, tmp_path: Path) -> tuple[str, Path]:
    adapter = pb.adapters.create(
        config=FinetuningConfig(base_model=base_model, adapter="lora", train_steps=4, learning_rate=5e-2),
        dataset="twice",
        repo="twice",
    )
    assert adapter.finetuning_error is None and adapter.artifact_path == "twice/1"
    archive = tmp_path / "adapter.zip"
    pb.adapters.download("twice/1", dest=str(archive))
    pb.deployments.create("own-model", config=DeploymentConfig(base_model=base_model))
    lorax = pb.deployments.client("own-model", serving_url_override=stack.url)
    answer = lorax.generate(PROMPT, adapter_id="twice/1", max_new_tokens=6)
    assert answer.generated_text, "an empty answer would make the comparison with PEFT vacuous"
    return str(answer.generated_text), archive


@pytest.fixture
def tiny_model(shared_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~800K-parameter Llama saved as any HF model is (tokenizer of tiny-random-llama)."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("own-model") / "m", shared_model_cache / "tiny-random-llama"
    )


def test_a_hub_id_in_the_hf_cache_trains_and_serves_through_the_predibase_sdk(
    worker_stack_factory: Callable[..., WorkerStack],
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub_cache = tmp_path / "hf-hub"
    snapshot = lay_out_hf_cache(hub_cache, HUB_ID, tiny_model, COMMIT)
    stack = worker_stack_factory("embedded", hf_hub_cache=hub_cache)
    stack.new_worker().start()
    pb, token = _sdk(stack, tmp_path, monkeypatch)

    served, archive = _train_and_serve(pb, stack, HUB_ID, tmp_path)

    assert served == _peft_greedy(snapshot, archive, tmp_path / "adapter", new_tokens=6)
    listed = {m["name"]: m for m in _base_models(stack, token)}
    assert listed[HUB_ID]["architecture"] == "llama" and listed[HUB_ID]["servable"] is True


def test_an_imported_model_trains_and_serves_from_s3_on_a_fresh_model_cache(
    worker_stack_factory: Callable[..., WorkerStack],
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh_cache = tmp_path / "fresh-model-cache"
    stack = worker_stack_factory("postgres_s3", model_cache_dir=fresh_cache)
    imported = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "models", "import", str(tiny_model), "--name", "team-llama"],
        env=settings_env(stack.settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr
    stack.new_worker().start()
    pb, _ = _sdk(stack, tmp_path, monkeypatch)

    served, archive = _train_and_serve(pb, stack, "team-llama", tmp_path)

    assert served == _peft_greedy(tiny_model, archive, tmp_path / "adapter", new_tokens=6)
    # Worker and serving process both fetched the weights from S3 into the fresh cache.
    assert any(fresh_cache.rglob("model.safetensors"))


def _base_models(stack: WorkerStack, token: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.url}/v2/base-models", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])
