"""The training-memory estimate (tuneforge.rules.memory) against real models: parameter counts against
`numel`, and the estimated peak against what a few training steps take on this CPU (within 30%).

`make test` measures tiny-random-llama in LoRA, QLoRA, full and Turbo LoRA mode, and smollm2-135m in
LoRA (about two minutes on a loaded 2-core machine); TUNEFORGE_MEMORY_CHECK_ALL=1 adds smollm2-135m's
full, QLoRA, checkpointed LoRA, DoRA, last-layer, Turbo LoRA (eagle, Medusa) and Turbo runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from tuneforge.config import FinetuningConfig
from tuneforge.rules import memory

from worker.training.base_models import resolve_base_model

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m"
PROBE = Path(__file__).with_name("memory_probe.py")
ROOT = Path(__file__).parents[3]
TOLERANCE = 0.30
# The smollm2 modes beyond LoRA take minutes on this machine: `make test` measures the cheap cases,
# TUNEFORGE_MEMORY_CHECK_ALL=1 adds the rest (collected only then, so nothing shows as skipped).
ALL = os.environ.get("TUNEFORGE_MEMORY_CHECK_ALL") == "1"


@pytest.fixture(scope="module")
def smollm2_cache(shared_model_cache: Path) -> Path:
    """The session's model cache: converted once, beside the other tests' smollm2-135m."""
    resolve_base_model(SMOLLM2, shared_model_cache)
    return shared_model_cache


def _config_json(weights: Path) -> dict[str, Any]:
    return dict(json.loads((weights / "config.json").read_text()))


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "model_class", "sizes"),
    [
        # GQA, an untied head.
        (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "tie_word_embeddings": False}),
        # A head_dim that is not hidden / heads, biases everywhere, a tied head.
        (LlamaConfig, LlamaForCausalLM, {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
        # Qwen2: biases on q, k and v only.
        (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
        (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 4, "tie_word_embeddings": False}),
    ],
)
def test_parameter_count_matches_numel_of_random_models(
    config_class: Any, model_class: Any, sizes: dict[str, Any]
) -> None:
    base = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3}
    config = config_class(**(base | {"num_attention_heads": 8} | sizes))
    model = model_class(config)
    assert memory.ModelShape.from_config(config.to_dict()).total_params() == sum(
        p.numel() for p in model.parameters()
    )


def test_parameter_count_matches_numel_of_the_builtins(tiny_cache: Path, smollm2_cache: Path) -> None:
    for weights in (tiny_cache / TINY, smollm2_cache / SMOLLM2):
        model = AutoModelForCausalLM.from_pretrained(weights)
        expected = sum(p.numel() for p in model.parameters())
        assert memory.ModelShape.from_config(_config_json(weights)).total_params() == expected, weights


def test_a_config_that_is_not_a_decoder_names_the_missing_key() -> None:
    with pytest.raises(memory.ModelShapeError, match="'intermediate_size'"):
        memory.ModelShape.from_config(
            {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
        )


# --- the estimate's shape ----------------------------------------------------------------------------


def test_checkpointing_quantisation_and_adapters_move_the_estimate_the_right_way(tiny_cache: Path) -> None:
    model = _config_json(tiny_cache / TINY)
    lora = FinetuningConfig(base_model=TINY, max_seq_length=512, micro_batch_size=8)
    plain = memory.estimate(model, lora)
    checkpointed = memory.estimate(model, lora, gradient_checkpointing=True)
    assert checkpointed.parts["activations"] < plain.parts["activations"]
    qlora = memory.estimate(model, lora.model_copy(update={"quantization_bits": 4}))
    assert qlora.parts["base_weights"] < plain.parts["base_weights"]
    full = memory.estimate(model, lora.model_copy(update={"adapter": "full"}))
    params = memory.ModelShape.from_config(model).total_params()
    # fp32 master + fp32 gradient + two fp32 AdamW moments.
    assert full.parts["base_weights"] + full.parts["gradients"] + full.parts["optimizer_state"] == 16 * params
    turbo = memory.estimate(model, lora.model_copy(update={"adapter": "turbo_lora"}))
    assert turbo.parts["speculator"] > 0 and turbo.total > plain.total
    assert (
        plain.parts["runtime_overhead"]
        > 0
        == memory.estimate(model, lora, device="cpu").parts["runtime_overhead"]
    )


def test_a_70b_model_needs_a_quantised_base_on_an_80_gib_gpu() -> None:
    llama_70b = {
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
    }
    assert memory.ModelShape.from_config(llama_70b).total_params() == pytest.approx(70.55e9, rel=0.01)
    config = FinetuningConfig(base_model="meta-llama/Llama-3.1-70B", max_seq_length=2048, micro_batch_size=1)
    bf16 = memory.fit(llama_70b, config, 80 * memory.GIB)
    assert not bf16.fits and not bf16.fits_with_checkpointing  # 141 GB of bf16 weights alone
    qlora = memory.fit(llama_70b, config.model_copy(update={"quantization_bits": 4}), 80 * memory.GIB)
    assert qlora.fits_with_checkpointing
    assert 35 * memory.GIB < qlora.checkpointed.total < 60 * memory.GIB


# --- against measured runs -------------------------------------------------------------------------


def _measure(weights: Path, params: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    """Runs memory_probe.py in a fresh process; its malloc hands freed tensors back to the system at once
    (a fixed mmap threshold), so resident memory follows live tensor bytes as a GPU allocator's does."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(PROBE), str(weights), json.dumps(params), str(steps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


MODES: dict[str, dict[str, Any]] = {
    "lora": {"adapter": "lora"},
    "qlora": {"adapter": "lora", "quantization_bits": 4},
    "full": {"adapter": "full"},
    "lora-checkpointed": {"adapter": "lora", "gradient_checkpointing": True},
    "dora": {"adapter": "dora"},
    "last_layer": {"adapter": "last_layer"},
    "turbo_lora-eagle": {"adapter": "turbo_lora"},
    "turbo_lora-medusa": {"adapter": "turbo_lora", "speculator_architecture": "medusa"},
    "turbo-eagle": {"adapter": "turbo"},
}


EVERY_RUN = [
    (TINY, "lora", 256, 4),
    (TINY, "qlora", 256, 4),
    (TINY, "full", 256, 4),
    (TINY, "turbo_lora-eagle", 128, 2),
    (SMOLLM2, "lora", 64, 2),
]
WITH_ALL = [
    (SMOLLM2, "full", 64, 2),
    (SMOLLM2, "qlora", 128, 2),
    (SMOLLM2, "lora-checkpointed", 128, 2),
    (SMOLLM2, "dora", 64, 2),
    (SMOLLM2, "last_layer", 64, 2),
    (SMOLLM2, "turbo_lora-eagle", 64, 2),
    (SMOLLM2, "turbo_lora-medusa", 64, 2),
    (SMOLLM2, "turbo-eagle", 64, 2),
]


@pytest.mark.parametrize(("model", "mode", "seq", "rows"), EVERY_RUN + (WITH_ALL if ALL else []))
def test_estimate_is_within_30_percent_of_measured_training_memory(
    model: str, mode: str, seq: int, rows: int, tiny_cache: Path, smollm2_cache: Path
) -> None:
    weights = (tiny_cache if model == TINY else smollm2_cache) / model
    params = {
        "base_model": model,
        "max_seq_length": seq,
        "micro_batch_size": rows,
        "effective_batch_size": rows,
        "dtype": "auto",
        **MODES[mode],
    }
    measured = _measure(weights, params)
    # The estimate for the dtype the run computed in ('auto' is bf16 or fp32 by CPU).
    config = FinetuningConfig.model_validate(params | {"dtype": measured["dtype"]})
    estimate = memory.estimate(_config_json(weights), config, device="cpu")
    ratio = estimate.total / measured["measured_bytes"]
    print(
        f"\n{model} {mode}: estimated {estimate.total / 2**20:.0f} MiB, measured "
        f"{measured['measured_bytes'] / 2**20:.0f} MiB ({ratio:.2f}); {estimate.parts}"
    )
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, (ratio, estimate.parts, measured)
