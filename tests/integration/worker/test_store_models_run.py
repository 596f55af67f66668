"""Models outside the built-ins, end to end on one worker: a job names an HF-cache model by its hub id and
the worker glue trains on it; a serving process fetches a stored model and answers as HF does."""

from __future__ import annotations

import json
import queue
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_dirs import lay_out_hf_cache
from model_store_support import COMMIT, HUB_ID, build_tiny_llama, put_in_store
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.context import AppContext
from app.db import AdapterVersion, Dataset, DatasetStatus, FinetuningJob, JobStatus
from app.db.session import transaction
from app.services import auth, repos
from app.settings import Settings
from app.storage import open_blob_store
from worker.serve_main import EngineOptions, _served
from worker.serving.adapters import LocalDirectorySource
from worker.serving.engine import LLMEngine
from worker.serving.params import SamplingParams
from worker.tasks import run_job

pytestmark = pytest.mark.integration

ROWS = [{"prompt": f"Say the number {n % 4}.", "completion": f" The number is {n % 4}."} for n in range(12)]


@pytest.fixture(scope="module")
def source_model(shared_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_dir = shared_model_cache / "tiny-random-llama"
    return build_tiny_llama(tmp_path_factory.mktemp("source") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def ctx(
    stack_settings_factory: Any, source_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppContext]:
    hub = tmp_path_factory.mktemp("hf-home") / "hub"
    lay_out_hf_cache(hub, HUB_ID, source_model, COMMIT)
    models = tmp_path_factory.mktemp("models")
    context = AppContext.from_settings(
        stack_settings_factory("embedded", hf_hub_cache=hub, model_cache_dir=models)
    )
    yield context
    context.close()


def _queued_job(ctx: AppContext, base_model: str) -> int:
    """A committed queued job on a connected prompt/completion dataset, in a tenant of its own."""
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
        key = f"tenants/{user.tenant.uuid}/datasets/{secrets.token_hex(8)}/data.jsonl"
        info = ctx.store.put_stream(key, [data])
        dataset = Dataset(
            tenant_id=user.tenant_id,
            created_by_id=user.id,
            name="numbers",
            status=DatasetStatus.CONNECTED,
            file_name="numbers.jsonl",
            blob_key=key,
            size_bytes=info.size,
            sha256=info.sha256,
            format="prompt_completion",
            row_count=len(ROWS),
        )
        session.add(dataset)
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, user.tenant.name, "alice")
        repo = repos.create(session, user, "numbers", None, exists_ok=True)
    with transaction(ctx.sessions) as session:
        config = {
            "base_model": base_model,
            "train_steps": 3,
            "micro_batch_size": 2,
            "effective_batch_size": 2,
        }
        version = AdapterVersion(
            repo_id=repo.id,
            created_by_id=user.id,
            tag=repos.allocate_tag(session, repo),
            base_model=base_model,
            config=config,
        )
        session.add(version)
        session.flush()
        job = FinetuningJob(
            tenant_id=user.tenant_id,
            created_by_id=user.id,
            repo_id=repo.id,
            version_id=version.id,
            dataset_id=dataset.id,
            base_model=base_model,
            adapter_type="lora",
            params=config,
        )
        session.add(job)
        session.flush()
        return job.id


def _run(ctx: AppContext, job_id: int) -> FinetuningJob:
    run_job(ctx, job_id, worker_id="test/1")
    with ctx.sessions() as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_a_job_naming_a_hub_id_trains_on_the_hf_cache_model(
    ctx: AppContext, source_model: Path, tmp_path: Path
) -> None:
    job = _run(ctx, _queued_job(ctx, HUB_ID))

    assert job.status == JobStatus.COMPLETED, job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None and version.artifact_prefix is not None
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / name).write_bytes(ctx.store.read_bytes(f"{version.artifact_prefix}{name}"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    # Trained on that very model: its LoRA matrices read the model's widths (hidden 16, MLP 32; the
    # built-in tiny model's are 64 and 128), and PEFT loads them on it.
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.shape[-1] for k, t in weights.items() if "lora_A" in k} == {16, 32}
    base = AutoModelForCausalLM.from_pretrained(source_model, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path))


def test_a_job_naming_a_model_the_worker_lacks_errors_with_the_pull_command(ctx: AppContext) -> None:
    job = _run(ctx, _queued_job(ctx, "other-org/missing-model"))

    assert job.status == JobStatus.ERRORED
    assert job.error is not None and "tuneforge models pull other-org/missing-model" in job.error


def _engine_greedy(engine: LLMEngine, prompt: list[int], new_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request = engine.add_request(prompt, params, None)
    request.deliver = queue.SimpleQueue()
    tokens: list[int] = []
    for _ in range(10 * new_tokens):
        engine.step()
        while not request.deliver.empty():
            item = request.deliver.get()
            if isinstance(item, BaseException):
                raise item
            tokens.append(item.token_id)
            if item.finished:
                return tokens
    raise AssertionError(f"the engine produced {tokens} and did not finish")


def _hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_a_serving_process_fetches_a_stored_model_and_answers_as_hf_does(
    source_model: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", model_cache_dir=tmp_path / "models")
    put_in_store(open_blob_store(settings), "my-model", source_model)
    options = EngineOptions(max_adapters=2, max_batch_size=4, kv_cache_bytes=16 << 20)

    config, source, ctx = _served(settings, "my-model", options, tmp_path / "adapters", "t")

    assert config.model_path == tmp_path / "models" / "store" / "my-model"
    assert isinstance(source, LocalDirectorySource) and ctx is None
    engine = LLMEngine(config, source)
    prompt = AutoTokenizer.from_pretrained(config.model_path)("Say the number 3.")["input_ids"]
    assert _engine_greedy(engine, prompt, 8) == _hf_greedy(source_model, prompt, 8)
