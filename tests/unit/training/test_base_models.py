"""Built-in base models resolve offline to loadable, trainable checkpoints, built once and atomically."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.training import base_models, model_dirs
from worker.training.base_models import (
    BUILTIN_MODELS,
    MANIFEST_NAME,
    BuiltinModel,
    UnknownBaseModelError,
    list_builtin_models,
    resolve_base_model,
)

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m"


@pytest.fixture
def tiny_dir(tiny_cache: Path) -> Path:
    return resolve_base_model(TINY, tiny_cache)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_tiny_random_llama_builds_bit_identical_in_two_caches(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    torch.manual_seed(1234)
    caller_rng = torch.random.get_rng_state()
    other = resolve_base_model(TINY, tmp_path_factory.mktemp("tiny-cache-2"))

    assert other != tiny_dir
    assert (other / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert _file_bytes(other) == _file_bytes(tiny_dir)
    # Seeding the build must not disturb the caller's random stream.
    assert torch.equal(torch.random.get_rng_state(), caller_rng)


def test_tiny_random_llama_loads_and_runs_a_forward_pass(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    batch = tokenizer(["Hello, world!"], return_tensors="pt")

    logits = model(**batch).logits

    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))  # [B, S, V]
    assert torch.isfinite(logits).all()
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == BUILTIN_MODELS[TINY].parameter_count
    assert (tiny_dir / "model.safetensors").stat().st_size < 20_000_000


def test_lora_on_tiny_random_llama_trains_one_step(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {name: p.detach().clone() for name, p in lora.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in lora.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)

    loss = lora(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()

    after = dict(lora.named_parameters())
    assert torch.isfinite(loss)
    assert any(not torch.equal(after[name], before) for name, before in trainable.items())
    assert all(torch.equal(after[name], before) for name, before in frozen.items())


def test_unknown_name_error_lists_builtin_models(tmp_path: Path) -> None:
    with pytest.raises(UnknownBaseModelError) as excinfo:
        resolve_base_model("meta-llama/Llama-3.1-8B", tmp_path / "cache")

    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "meta-llama/Llama-3.1-8B" in message
    assert SMOLLM2 in message and TINY in message
    assert "locally" in message
    assert not (tmp_path / "cache").exists()


def test_existing_local_directory_is_passed_through(tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-model"
    checkpoint.mkdir()

    assert resolve_base_model(str(checkpoint), tmp_path / "cache") == checkpoint
    assert not (tmp_path / "cache").exists()


def test_second_resolve_reuses_cache_without_rebuilding(tiny_cache: Path) -> None:
    weights = tiny_cache / TINY / "model.safetensors"
    before = weights.stat()

    started = time.perf_counter()
    again = resolve_base_model(TINY, tiny_cache)
    elapsed = time.perf_counter() - started

    after = (again / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert elapsed < 1.0


def test_list_builtin_models_describes_each_model() -> None:
    listed = {entry["name"]: entry for entry in list_builtin_models()}

    assert set(listed) == {SMOLLM2, TINY}
    assert listed[SMOLLM2]["context_length"] == 8192
    assert listed[SMOLLM2]["parameter_count"] == 134_515_008
    assert all(entry["chat_template"] is True and entry["description"] for entry in listed.values())


# --- cache machinery, on a fake model whose build is cheap and counted ---------------------------


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BuiltinModel, list[Path]]:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"version 1")
    builds: list[Path] = []

    def build(out_dir: Path, src: Path) -> None:
        builds.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"from": src.read_text()}))

    spec = BuiltinModel("fake", "a fake model", 1, 16, False, source=lambda: source, build=build)
    monkeypatch.setitem(BUILTIN_MODELS, "fake", spec)
    return spec, builds


def test_changed_source_content_triggers_rebuild_but_a_touch_does_not(
    fake_model: tuple[BuiltinModel, list[Path]], tmp_path: Path
) -> None:
    spec, builds = fake_model
    cache = tmp_path / "cache"
    resolve_base_model("fake", cache)
    source = spec.source()

    os.utime(source, ns=(1, 1))  # same bytes, new stat: rehashed, still current
    resolve_base_model("fake", cache)
    assert len(builds) == 1

    source.write_bytes(b"version 2")
    target = resolve_base_model("fake", cache)
    assert len(builds) == 2
    assert json.loads((target / "config.json").read_text()) == {"from": "version 2"}


def test_new_transformers_version_triggers_rebuild(
    fake_model: tuple[BuiltinModel, list[Path]], tmp_path: Path
) -> None:
    _, builds = fake_model
    target = resolve_base_model("fake", tmp_path / "cache")
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    (target / MANIFEST_NAME).write_text(json.dumps(manifest | {"transformers_version": "4.0.0"}))

    resolve_base_model("fake", tmp_path / "cache")

    assert len(builds) == 2


def test_failed_build_leaves_no_half_cache(
    fake_model: tuple[BuiltinModel, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = fake_model

    def crash_half_way(out_dir: Path, src: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(BUILTIN_MODELS, "fake", replace(spec, build=crash_half_way))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        resolve_base_model("fake", cache)

    assert sorted(p.name for p in cache.iterdir()) == ["fake.lock"]


def test_leftovers_of_a_killed_build_are_swept_by_the_next(
    fake_model: tuple[BuiltinModel, list[Path]], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    leftover = cache / ".fake.building-0123"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")

    resolve_base_model("fake", cache)

    assert sorted(p.name for p in cache.iterdir()) == ["fake", "fake.lock"]


def test_resolve_waits_for_a_build_in_progress_and_does_not_rebuild(
    fake_model: tuple[BuiltinModel, list[Path]], tmp_path: Path
) -> None:
    spec, builds = fake_model
    cache = tmp_path / "cache"
    cache.mkdir()
    resolved: list[Path] = []
    waiter = threading.Thread(target=lambda: resolved.append(resolve_base_model("fake", cache)))

    # This test plays the other process: it holds the lock while it builds.
    with model_dirs.exclusive_lock(cache / "fake.lock"):
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not builds
        base_models._build_atomically(spec, cache / "fake", spec.source())
    waiter.join(timeout=10)

    assert resolved == [cache / "fake"]
    assert len(builds) == 1


# --- the real SmolLM2 conversion (about 20-25 s on a 2-core CPU) -----------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("smollm2-cache")
    started = time.perf_counter()
    checkpoint = resolve_base_model(SMOLLM2, cache)
    print(f"\nsmollm2-135m conversion took {time.perf_counter() - started:.1f} s")
    return checkpoint


def test_smollm2_conversion_is_a_plain_trainable_checkpoint(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(["The capital of France is Paris."], return_tensors="pt")

    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()

    assert "quantization_config" not in config
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == BUILTIN_MODELS[SMOLLM2].parameter_count
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.requires_grad and q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    # Real pretrained weights predict ordinary English well; random ones sit near ln(49152) = 10.8.
    assert loss.item() < 5.0


def test_smollm2_chat_template_survives_and_answers_sensibly(smollm2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert "Paris" in answer
