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
        for name, param in heads.named_parameters():
            if name.endswith("linear.weight"):
                param.normal_(0, 2.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads.save(out_dir)
    return out_dir


def make_random_eagle(
    out_dir: Path,
    model_dir: Path,
    *,
    depth: int = 3,
    seed: int = 0,
    draft_vocab: list[int] | None = None,
    scale: float = 1.0,
) -> Path:
    """Saves a random eagle draft layer (speculator_config.json "eagle_layer") shaped for the model in
    `model_dir`: weights scaled like an initialised layer, so drafts vary from step to step."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    config: Any = AutoConfig.from_pretrained(model_dir)
    d, inter = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // hq
    generator = torch.Generator().manual_seed(seed)

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=generator) * scale / inp**0.5

    state = {
        "fc.weight": linear(d, 2 * d),
        "layer.input_norm.weight": torch.ones(d),
        "layer.q_proj.weight": linear(hq * hd, d),
        "layer.k_proj.weight": linear(hkv * hd, d),
        "layer.v_proj.weight": linear(hkv * hd, d),
        "layer.o_proj.weight": linear(d, hq * hd),
        "layer.post_norm.weight": torch.ones(d),
        "layer.gate_proj.weight": linear(inter, d),
        "layer.up_proj.weight": linear(inter, d),
        "layer.down_proj.weight": linear(d, inter),
    }
    if draft_vocab is not None:
        state["draft_vocab"] = torch.tensor(sorted(draft_vocab), dtype=torch.long)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "speculator.safetensors"))
    (out_dir / "speculator_config.json").write_text(
        json.dumps(
            {
                "architecture": "eagle_layer",
                "hidden_size": d,
                "num_heads": depth,
                "num_attention_heads": hq,
                "num_key_value_heads": hkv,
                "head_dim": hd,
                "intermediate_size": inter,
                "rms_norm_eps": config.rms_norm_eps,
                "trained_steps": 0,
            }
        )
    )
    return out_dir
