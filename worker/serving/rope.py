"""Rotary position embedding as the serving engine applies it, to the base model's and draft layers' heads."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Heads `[T, H, hd]` rotated by their positions' `cos`/`sin` `[T, 1, hd]` (HF's half-split layout)."""
    return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
