"""Rotary position embedding as the serving engine applies it, to the base model's and draft layers' heads."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Heads `[T, H, hd]` rotated by their positions' `cos`/`sin` `[T, 1, rd]` (HF's half-split layout).

    With partial rotary (Phi3's `partial_rotary_factor`) the table is narrower than a head: only the
    first `rd` dimensions rotate, the rest pass through.
    """
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
