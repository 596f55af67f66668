"""LoRA for batched serving: one adapter's values never reach another's rows, and a file is checked
against the shared rules and the base model's real projection shapes before it is served."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tuneforge import lora_rules

from worker.serving.adapter_loader import LoadShape, load_adapter
from worker.serving.errors import AdapterLoadError
from worker.serving.lora import AdapterWeights, LoraBatch, LoraStacker
from worker.serving.model_runner import ModelRunner

# tiny-random-llama's projections, (in, out): what the runner reports and adapters must fit.
SHAPES = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}


def test_the_runner_reports_the_shapes_of_its_real_projections(tiny_model_dir: Path) -> None:
    runner = ModelRunner(tiny_model_dir, dtype="fp32", kv_cache_bytes=1 << 22, max_model_len=64)
    assert runner.module_shapes == SHAPES
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert runner.module_shapes == lora_rules.projection_shapes(config)


def _weights(key: str, a_scale: float, seed: int) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        (0, "q_proj"): (
            torch.randn(4, 64, generator=generator) * a_scale,
            torch.randn(64, 4, generator=generator),
        ),
        (0, "v_proj"): (
            torch.randn(4, 64, generator=generator) * a_scale,
            torch.randn(32, 4, generator=generator),
        ),
    }
    return AdapterWeights(key=key, modules=modules, base_model=None, nbytes=0)


def _qkv_delta(adapters: list[AdapterWeights], token_adapter: list[int], x: torch.Tensor) -> torch.Tensor:
    batch = LoraBatch(LoraStacker().stacks(adapters), torch.tensor(token_adapter))
    y = torch.zeros(x.shape[0], 128)
    batch.apply(0, "qkv", x, y, {"q_proj": slice(0, 64), "k_proj": slice(64, 96), "v_proj": slice(96, 128)})
    return y


def test_an_adapter_overflowing_to_inf_changes_no_other_row() -> None:
    """Finite weights (they pass the load checks) so large that x @ A overflows: with a 0/1 mask
    multiplied in, Inf x 0 = NaN would land in every row of the step."""
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    owners = [0, 0, 1, 1, -1, 0]  # rows 2 and 3 are the hot adapter's, row 4 the base model's
    honest = _weights("honest", 1.0, seed=1)
    hot = _weights("hot", 3e38, seed=2)
    quiet = _weights("quiet", 0.0, seed=2)  # the same shapes, and zeros: what the others must see
    with_hot = _qkv_delta([honest, hot], owners, x)
    with_quiet = _qkv_delta([honest, quiet], owners, x)
    others = [0, 1, 4, 5]
    assert not torch.isfinite(with_hot[2:4]).all()  # the hot adapter's own rows did overflow
    assert torch.isfinite(with_hot[others]).all()
    assert torch.equal(with_hot[others], with_quiet[others])
    assert torch.equal(with_hot[4], torch.zeros(128))


def _write(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    **config: Any,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    body = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} | config
    (directory / "adapter_config.json").write_text(json.dumps(body))
    return directory


def _pair(layer: int = 0, module: str = "q_proj", rank: int = 4, a_in: int = 64) -> dict[str, torch.Tensor]:
    parent = lora_rules.PROJECTION_PARENTS[module]
    prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
    out = SHAPES[module][1]
    return {
        f"{prefix}.lora_A.weight": torch.randn(rank, a_in),
        f"{prefix}.lora_B.weight": torch.randn(out, rank),
    }


def _load(directory: Path, **overrides: Any) -> AdapterWeights:
    kwargs: dict[str, Any] = {
        "num_layers": 2,
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "module_shapes": SHAPES,
        "max_rank": 64,
    } | overrides
    return load_adapter("key", directory, LoadShape(**kwargs))


def _poisoned(value: float) -> dict[str, torch.Tensor]:
    tensors = _pair()
    next(t for name, t in tensors.items() if "lora_B" in name)[3, 1] = value
    return tensors


@pytest.mark.parametrize(
    ("tensors", "config", "overrides", "reason"),
    [
        (_poisoned(float("nan")), {}, {}, "lora_B holds NaN or infinite values"),
        (_poisoned(float("inf")), {}, {}, "lora_B holds NaN or infinite values"),
        (_pair(), {"lora_alpha": 1e40}, {}, "after scaling"),  # finite in the file, infinite once scaled
        (_poisoned(1e5), {}, {"dtype": torch.float16}, "float16"),  # finite in fp32, not in fp16
        (_pair(a_in=65), {}, {}, "its input has 64 features, not 65"),
        (_pair(layer=2), {}, {}, "layer 2 does not exist"),
        (_pair(rank=65), {"r": 65}, {}, "65 is not a rank in 1..64"),
        (_pair(rank=65), {}, {}, "rank 65 is over the limit of 64"),
        ({"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64)}, {}, {}, "not a LoRA projection"),
        ({k: v.to(torch.int32) for k, v in _pair().items()}, {}, {}, "is not a float type"),
        (_pair(), {"target_modules": ["q_proj", "lm_head"]}, {}, "lm_head"),
        (_pair(), {"alpha_pattern": {"q_pr(o|a)j": 4}}, {}, "alpha_pattern"),
        (_pair(), {"rank_pattern": {"q_proj": 1000}}, {}, "rank_pattern"),
        (_pair(), {"peft_type": "IA3"}, {}, "peft_type"),
    ],
)
def test_an_adapter_breaking_a_rule_is_refused_naming_it_without_a_server_path(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    overrides: dict[str, Any],
    reason: str,
) -> None:
    directory = _write(tmp_path / "adapter", tensors, **config)
    with pytest.raises(AdapterLoadError) as caught:
        _load(directory, **overrides)
    assert reason in caught.value.message
    assert str(tmp_path) not in caught.value.message


def test_a_catastrophic_regex_pattern_key_is_refused_at_once(tmp_path: Path) -> None:
    directory = _write(tmp_path / "adapter", _pair(), alpha_pattern={"(.+)+!": 16, "(a|a)*$": 2})
    started = time.monotonic()
    with pytest.raises(AdapterLoadError, match="literal module-name suffixes"):
        _load(directory)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", r"^model\.layers\.0\.self_attn\.q_proj"])
def test_an_alpha_pattern_key_scales_the_module_it_names_literally(tmp_path: Path, key: str) -> None:
    tensors = _pair() | _pair(layer=1)
    directory = _write(tmp_path / "adapter", tensors, alpha_pattern={key: 32})
    loaded = _load(directory)
    b_name = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"
    for layer in (0, 1):
        named = key != r"^model\.layers\.0\.self_attn\.q_proj" or layer == 0
        scale = (32 if named else 8) / 4
        assert torch.allclose(loaded.modules[(layer, "q_proj")][1], tensors[b_name.format(layer)] * scale)


def test_an_unreadable_weights_file_is_refused_without_the_readers_message(tmp_path: Path) -> None:
    directory = _write(tmp_path / "adapter", _pair())
    (directory / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterLoadError) as caught:
        _load(directory)
    assert caught.value.message == "adapter_model.safetensors is not a readable safetensors file"
