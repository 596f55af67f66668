"""Training is not Llama-only: small random models of other families that PEFT supports train LoRA and
DoRA with the default targets (Phi-3's fused projections, GPT-2's Conv1D attention) and give adapters
that PEFT loads back onto the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from training_support import make_config, number_rows
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GPT2Config,
    Phi3Config,
    Qwen3Config,
)

from worker.training.loop import train

SMALL: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS: dict[str, Any] = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
FAMILIES: dict[str, tuple[Any, dict[str, Any], set[str]]] = {
    "qwen3": (Qwen3Config, SMALL | HEADS | {"head_dim": 8}, {"q_proj", "v_proj", "gate_proj", "down_proj"}),
    "gemma2": (Gemma2Config, SMALL | HEADS | {"head_dim": 8, "sliding_window": 16}, {"o_proj", "up_proj"}),
    "phi3": (Phi3Config, SMALL | HEADS | {"pad_token_id": 0}, {"qkv_proj", "gate_up_proj"}),
    "gpt2": (GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, {"c_attn"}),
}


def _tiny_family_model(family: str, out: Path, tokenizer_dir: Path) -> Path:
    config_class, fields, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_class(vocab_size=len(tokenizer), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("adapter", ["lora", "dora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_of_another_family_trains_an_adapter_peft_loads(
    family: str, adapter: str, tiny_cache: Path, tmp_path: Path
) -> None:
    model_dir = _tiny_family_model(family, tmp_path / "base", tiny_cache / "tiny-random-llama")
    config = make_config(base_model=f"acme/tiny-{family}", adapter=adapter, train_steps=3)

    result = train(config, number_rows(16), output_dir=tmp_path / "run", model_dir=model_dir)

    assert result.adapter_dir is not None
    assert result.summary["data"]["rows_without_targets"] == 0
    assert result.summary["result"]["train_loss"] > 0
    targets = set(result.summary["config_used"]["target_modules"])
    assert FAMILIES[family][2] <= targets, f"{family} trained {targets}"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.adapter_dir)
    trained = [n for n, p in peft.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert trained, "the adapter's B matrices moved off zero: the run trained something"


def test_soft_capped_attention_equals_gemma2s_eager_attention_packed_or_not() -> None:
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from worker.training.attention import capped_attention, varlen_sdpa_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.head_dim, module.num_key_value_groups, module.training = 8, 2, False  # type: ignore[assignment]
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    positions = torch.arange(12)
    window = 5
    keep = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    additive = torch.zeros(12, 12).masked_fill(~keep, float("-inf"))[None, None]
    expected, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3, softcap=2.0)

    assert torch.allclose(capped_attention(q, k, v, None, 0.3, 2.0, window), expected, atol=1e-6)
    # A packed row of two examples: each attends only within itself, as if it were alone.
    packed, _ = varlen_sdpa_attention(
        module,
        q,
        k,
        v,
        None,
        scaling=0.3,
        softcap=2.0,
        sliding_window=window,
        cu_seq_lens_q=torch.tensor([0, 7, 12]),
    )
    second, _ = eager_attention_forward(
        module, q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], additive[..., :5, :5], scaling=0.3, softcap=2.0
    )
    assert torch.allclose(packed[:, :7], expected[:, :7], atol=1e-6)
    assert torch.allclose(packed[:, 7:], second, atol=1e-6)
