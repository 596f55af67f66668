"""Owns variable-length ("packed") attention: several examples in one row, each attending only to itself.

Packing removes padding, but plain causal attention over a packed row would let an example see
the ones before it. Where flash-attention's varlen kernel exists, transformers handles packed rows
itself; elsewhere (the CPU, a GPU without flash-attn) a block-diagonal mask would still compute
every cross-example score and throw it away. This module registers an attention implementation
that instead runs causal SDPA per example segment, given the segment boundaries `cu_seq_lens_q`
that the training batch passes through the model's forward kwargs. Without those kwargs (eval of
padded batches, generation) it is exactly transformers' SDPA, masks included.

On a CUDA device computing in fp16/bf16 with the `flash-attn` package installed, the model is loaded
with transformers' "flash_attention_2" instead, whose varlen kernel reads the same boundaries (on the
GPU) and skips the cross-example blocks entirely.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_ATTENTION = "tuneforge_varlen"
FLASH_ATTENTION = "flash_attention_2"


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, Hkv, T, D]
    value: torch.Tensor,  # [B, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each [cu[i], cu[i+1]) segment of a packed row; SDPA otherwise.

    Gemma-2's soft-capped scores (`softcap`) are not something SDPA computes: those layers take the
    written-out path, with their sliding window, packed or not.
    """
    boundaries = kwargs.pop("cu_seq_lens_q", None)
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    if boundaries is None or query.shape[2] != key.shape[2]:
        # Not a packed training row (or decoding against a cache): transformers' own SDPA path.
        if softcap is not None:
            return capped_attention(query, key, value, attention_mask, scaling, softcap, window), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row per batch, got {query.shape[0]}")
    edges = boundaries.tolist() if isinstance(boundaries, torch.Tensor) else list(boundaries)
    segments = []
    for start, end in itertools.pairwise(edges):
        if softcap is not None or (window is not None and end - start > window):
            segment = [t[:, :, start:end] for t in (query, key, value)]
            segments.append(capped_attention(*segment, None, scaling, softcap, window))
            continue
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,  # causal within the segment; nothing outside it is visible
            dropout,
            scaling,
            is_causal=True,
        )
        segments.append(out)  # [1, end - start, H, D]
    return torch.cat(segments, dim=1), None  # [1, T, H, D]


def capped_attention(
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [B, 1, T, S]: bool (True = attend) or additive; None = causal
    scaling: float | None,
    softcap: float | None,
    window: int | None,
) -> torch.Tensor:
    """Attention written out: scores · scaling, soft-capped as cap·tanh(s / cap), masked (causal and
    within `window` positions when no mask is given), softmax in fp32. Returns [B, T, H, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        rows = torch.arange(query.shape[2], device=query.device)[:, None] + (key.shape[2] - query.shape[2])
        cols = torch.arange(key.shape[2], device=query.device)[None, :]
        keep = cols <= rows
        if window is not None:
            keep &= rows - cols < window
        scores = scores.masked_fill(~keep, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


def register_varlen_attention() -> str:
    """Make `attn_implementation=VARLEN_ATTENTION` loadable; idempotent. Returns the name."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    # Masks for unpacked calls are SDPA's; a packed row's mask is built but ignored (cheap beside the pass).
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


def choose_implementation(device_type: str, half: bool, flash_installed: bool | None = None) -> str:
    """The attention a training model is loaded with: flash-attention's varlen kernel where it runs (a
    CUDA device, fp16/bf16 compute, `flash-attn` installed), tuneforge's per-segment SDPA otherwise.
    `flash_installed`: None probes for the package."""
    if flash_installed is None:
        flash_installed = importlib.util.find_spec("flash_attn") is not None
    if device_type == "cuda" and half and flash_installed:
        return FLASH_ATTENTION
    return register_varlen_attention()


def reads_boundaries_on_device(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention wants a packed row's boundaries on its device (flash-attention's
    kernel does; the SDPA fallback reads them on the host, where reading them costs no sync)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == FLASH_ATTENTION
