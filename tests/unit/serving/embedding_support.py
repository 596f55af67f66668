"""The reference the embedding tests compare with: HF's own forward pass, PEFT's for an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM


def hf_embeddings(model_dir: Path, adapter_dir: Path | None, inputs: list[list[int]]) -> torch.Tensor:
    """HF's (with PEFT's LoRA) final-norm hidden states of each input alone, mean-pooled, L2-normalised."""
    # Eager attention: the only HF path that soft-caps Gemma2's attention logits.
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    rows = []
    with torch.no_grad():
        for tokens in inputs:
            out = model(torch.tensor([tokens]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0].mean(0))
    return F.normalize(torch.stack(rows), dim=-1)
