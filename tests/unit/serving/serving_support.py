"""Shared by the serving tests: random-but-real PEFT LoRA adapters of different shapes on one base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TINY = "tiny-random-llama"

# Different ranks and target modules on purpose: one batch must serve them all.
ADAPTER_SHAPES: dict[str, dict[str, Any]] = {
    "acme/1": {"r": 8, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 16},
    "acme/2": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_alpha": 8},
    "acme/3": {"r": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"], "lora_alpha": 16},
    "acme/4": {
        "r": 2,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_alpha": 8,
    },
}


def make_lora_adapter(
    base_dir: Path, out_dir: Path, *, seed: int, scale: float = 0.05, **lora: object
) -> Path:
    """Saves a PEFT LoRA whose B matrices are random (not PEFT's zeros), so it changes the outputs."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn_like(param) * scale * (4 if "lora_B" in name else 1))
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def make_adapter_set(base_dir: Path, root: Path) -> dict[str, Path]:
    """Writes every shape of ADAPTER_SHAPES under `root/<repo>/<N>` (what LocalDirectorySource reads)."""
    made = {}
    for seed, (adapter_id, shape) in enumerate(ADAPTER_SHAPES.items()):
        made[adapter_id] = make_lora_adapter(base_dir, root / adapter_id, seed=seed + 1, **shape)
    return made


def make_random_heads(out_dir: Path, *, hidden_size: int, num_heads: int, seed: int = 0) -> Path:
    """Saves a heads-only Turbo speculator far from identity: many of its drafts are rejected."""
    from worker.training.speculator import MedusaHeads, SpeculatorConfig

    torch.manual_seed(seed)
    heads = MedusaHeads(SpeculatorConfig(hidden_size=hidden_size, num_heads=num_heads))
    with torch.no_grad():
        for head in heads.heads:
            head.linear.weight.normal_(0, 2.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads.save(out_dir)
    return out_dir
