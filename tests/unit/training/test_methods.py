"""Every training method trains and publishes weights that standard loaders reproduce exactly."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from training_support import TINY, make_config, number_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.training.base_models import resolve_base_model
from worker.training.batches import pad, token_loss_sum
from worker.training.data import prepare_data
from worker.training.loop import TrainingResult, train
from worker.training.methods import NonFiniteWeightsError
from worker.training.preparation import resolve_config
from worker.training.runtime import resolve_runtime


def held_out_loss(model: torch.nn.Module, tiny_cache: Path, config_overrides: dict) -> float:
    """The eval split's loss computed independently of the training loop: one row at a time, fp32."""
    directory = resolve_base_model(TINY, tiny_cache)
    config = resolve_config(make_config(**config_overrides), directory, resolve_runtime("fp32"))
    data = prepare_data(number_rows(), AutoTokenizer.from_pretrained(directory), config)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.eval:
            batch = pad([example], pad_token_id=0)
            total += token_loss_sum(model.eval(), batch).item()
            count += batch.target_count
    return total / count


def run(tmp_path: Path, tiny_cache: Path, **overrides: object) -> TrainingResult:
    result = train(make_config(**overrides), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    assert result.adapter_dir is not None and not result.stopped
    return result


def base(tiny_cache: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_base_model(TINY, tiny_cache), dtype=torch.float32)


def test_lora_adapter_reloads_with_peft_and_reproduces_the_final_eval_loss(
    tiny_cache: Path, tmp_path: Path
) -> None:
    result = run(tmp_path, tiny_cache, train_steps=8)
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before
    reloaded = PeftModel.from_pretrained(base(tiny_cache), result.adapter_dir)
    assert held_out_loss(reloaded, tiny_cache, {}) == pytest.approx(result.eval_loss_after, rel=1e-5)
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert summary["method"]["method"] == "lora" and summary["result"]["steps"] == 8


def test_dora_trains_magnitudes_and_reloads(tiny_cache: Path, tmp_path: Path) -> None:
    result = run(tmp_path, tiny_cache, adapter="dora", train_steps=4)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in weights)
    reloaded = PeftModel.from_pretrained(base(tiny_cache), result.adapter_dir)
    assert held_out_loss(reloaded, tiny_cache, {}) == pytest.approx(result.eval_loss_after, rel=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_a_quantised_base_on_the_cpu(tiny_cache: Path, tmp_path: Path, bits: int) -> None:
    result = run(tmp_path, tiny_cache, quantization_bits=bits, train_steps=8, dtype="auto")
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before - 0.1
    assert result.summary["method"]["quantization_bits"] == bits
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == TINY  # loads on the unquantised base too


def test_full_fine_tuning_saves_a_model_from_pretrained_loads(tiny_cache: Path, tmp_path: Path) -> None:
    result = run(tmp_path, tiny_cache, adapter="full", train_steps=6, learning_rate=1e-3)
    loaded = AutoModelForCausalLM.from_pretrained(result.adapter_dir, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(result.adapter_dir).eos_token == "<|im_end|>"
    assert held_out_loss(loaded, tiny_cache, {}) == pytest.approx(result.eval_loss_after, rel=1e-5)
    assert result.summary["method"]["trainable_parameters"] == result.summary["method"]["total_parameters"]


def test_last_layer_tuning_changes_only_the_final_block_norm_and_head(
    tiny_cache: Path, tmp_path: Path
) -> None:
    result = run(tmp_path, tiny_cache, adapter="last_layer", train_steps=4, learning_rate=1e-3)
    before = base(tiny_cache).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.adapter_dir, dtype=torch.float32).state_dict()
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    last = len([n for n in before if n.endswith("self_attn.q_proj.weight")]) - 1
    assert changed and all(
        name.startswith(f"model.layers.{last}.")
        or name in {"model.norm.weight", "lm_head.weight"}
        or name == "model.embed_tokens.weight"  # tied to the head in this model
        for name in changed
    ), changed
    assert any(name.startswith(f"model.layers.{last}.") for name in changed)
    assert result.summary["method"]["trained_modules"] == [f"layers.{last}", "norm", "lm_head"]


def test_continuing_from_a_version_starts_from_its_weights(tiny_cache: Path, tmp_path: Path) -> None:
    parent = run(tmp_path / "parent", tiny_cache, train_steps=6)
    child = train(
        make_config(train_steps=2, learning_rate=1e-3),
        number_rows(),
        output_dir=tmp_path / "child",
        cache_dir=tiny_cache,
        init_from=parent.adapter_dir,
    )
    # The child's starting point is the parent's end, not the base model.
    assert child.eval_loss_before == pytest.approx(parent.eval_loss_after, rel=1e-5)
    assert child.adapter_dir is not None
    want = load_file(parent.adapter_dir / "adapter_model.safetensors")
    got = load_file(child.adapter_dir / "adapter_model.safetensors")
    assert want.keys() == got.keys() and any(not torch.equal(want[k], got[k]) for k in want)


def test_dtype_auto_uses_native_bf16_here_and_records_it(tiny_cache: Path, tmp_path: Path) -> None:
    result = run(tmp_path, tiny_cache, dtype="auto", train_steps=2)
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert result.summary["runtime"]["dtype"] == expected
    assert result.summary["config_used"]["dtype"] == expected
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # adapters keep fp32 masters


def test_automatic_layers_and_ranks_are_applied_recorded_and_reload(tiny_cache: Path, tmp_path: Path) -> None:
    overrides = {"rank": "auto", "layer_selection_percentage": 0.5, "n_test_samples": 8}
    result = run(tmp_path, tiny_cache, train_steps=4, **overrides)
    decisions = result.summary["autoconfig"]
    assert len(decisions["selected_layers"]) == 1  # half of the tiny model's 2 layers
    assert set(decisions["layer_scores"]) == {"0", "1"}
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["layers_to_transform"] == decisions["selected_layers"]
    assert adapter_config["rank_pattern"] and set(adapter_config["rank_pattern"].values()) <= set(
        range(4, 65)
    )
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    layer = decisions["selected_layers"][0]
    assert all(f"layers.{layer}." in name for name in weights)  # nothing trained elsewhere
    reloaded = PeftModel.from_pretrained(base(tiny_cache), result.adapter_dir)
    assert held_out_loss(reloaded, tiny_cache, {}) == pytest.approx(result.eval_loss_after, rel=1e-5)


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_cache: Path, tmp_path: Path) -> None:
    plain = run(tmp_path / "plain", tiny_cache, train_steps=3)
    checkpointed = run(tmp_path / "ckpt", tiny_cache, train_steps=3, gradient_checkpointing=True)
    assert checkpointed.eval_loss_after == pytest.approx(plain.eval_loss_after, rel=1e-5)


def test_non_finite_weights_end_the_run_and_nothing_is_saved(tiny_cache: Path, tmp_path: Path) -> None:
    """A parent whose lora_B holds one NaN: the forward pass is NaN, so is every update, and the run
    must not checkpoint or publish weights that only ever produce NaN."""
    parent = run(tmp_path / "parent", tiny_cache, train_steps=2)
    assert parent.adapter_dir is not None
    poisoned = tmp_path / "poisoned"
    shutil.copytree(parent.adapter_dir, poisoned)
    weights = load_file(poisoned / "adapter_model.safetensors")
    name = next(k for k in sorted(weights) if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(poisoned / "adapter_model.safetensors"))

    with pytest.raises(NonFiniteWeightsError, match="NaN or infinite weights"):
        train(
            make_config(train_steps=2, checkpoint_every_n_steps=1),
            number_rows(),
            output_dir=tmp_path / "child",
            cache_dir=tiny_cache,
            init_from=poisoned,
        )
    assert not (tmp_path / "child" / "adapter").exists()
    assert list((tmp_path / "child").rglob("adapter_model.safetensors")) == []
