"""Tiny random checkpoints of the model families beyond Llama the serving engine runs, and HF's greedy
output on them (eager attention: the only HF path that soft-caps Gemma2's attention logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen3Config,
)

# A window far shorter than the test prompts plus their generations, so the masking is exercised.
WINDOW = 8
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}


def family_config(family: str, tokenizer: Any) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `family` using every feature the engine must reproduce."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "qwen3":
        # head_dim (24) is not hidden / heads (16): the engine must take it from the config.
        return Qwen3Config(**SHAPE, **ids, head_dim=24, tie_word_embeddings=True)
    if family == "gemma2":
        return Gemma2Config(
            **SHAPE, **ids, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
        )  # fmt: skip
    if family == "gemma3_text":
        return Gemma3TextConfig(
            **SHAPE, **ids, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
            },
        )  # fmt: skip
    if family == "phi3":
        return Phi3Config(
            **SHAPE, **ids, sliding_window=WINDOW, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        )  # fmt: skip
    raise ValueError(f"no test config for {family}")


def build_family_model(family: str, tokenizer_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Saves a seeded random model of `family` with the tokenizer from `tokenizer_dir`. Norm weights are
    randomised too (HF initialises them to the identity), so a norm applied wrong changes the output."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        offset = 0.0 if family.startswith("gemma") else 1.0  # Gemma stores norms as an offset from 1
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(offset + 0.3 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_greedy_eager(
    model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """HF (with PEFT for an adapter) greedy generation of each prompt alone, EOS ignored."""
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
            outs.append(out[0, len(prompt) :].tolist())
    return outs
