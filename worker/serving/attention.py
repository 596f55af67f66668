"""The attention step of the serving engine: causal prefill over each sequence's own tokens and decode
against the paged cache's gathered context, with a layer's sliding window and logit soft-capping.

A sliding window is applied as a mask (keys more than `window - 1` positions behind the query are
hidden, HF's `kv_idx > q_idx - window`): the cache keeps every position, so a window costs only the
mask. Soft-capping (`cap·tanh(scores / cap)`) happens between the product and the softmax, which
`scaled_dot_product_attention` cannot do; those layers run the product and softmax written out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends: query scaling, soft-cap of the scores, sliding window (None: all keys)."""

    scale: float
    softcap: float | None = None
    window: int | None = None


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], spec: AttentionSpec
) -> torch.Tensor:
    """Causal attention of each sequence over its own tokens: q `[T, H, hd]`, k/v `[T, KV, hd]` →
    `[T, H * hd]` (nothing is cached before a prefill)."""
    outs = []
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        mask = None
        if spec.window is not None and length > spec.window:
            query = torch.arange(length, device=q.device)[:, None]
            keys = torch.arange(length, device=q.device)[None, :]
            mask = (keys <= query) & (keys > query - spec.window)  # [L, L]
        out = attend(
            q[sl].transpose(0, 1)[None],  # [1, H, L, hd]
            k[sl].transpose(0, 1)[None],
            v[sl].transpose(0, 1)[None],
            mask,
            spec,
            causal=mask is None,
        )
        outs.append(out[0].transpose(0, 1).reshape(length, -1))
        start += length
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def cached_prefill_attention(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: list[int],
    starts: list[int],
    spec: AttentionSpec,
) -> torch.Tensor:
    """Causal attention of each sequence's fed tokens (`lengths[i]` of them, from position `starts[i]`)
    over its context in the cache, its fed tokens included: q `[T, H, hd]`, keys[i]/values[i]
    `[starts[i] + lengths[i], KV, hd]` → `[T, H * hd]`. One sequence at a time: a decoding sequence in
    the step costs one query, not a padded row as wide as the longest chunk."""
    outs = []
    offset = 0
    for length, start, k, v in zip(lengths, starts, keys, values, strict=True):
        query = torch.arange(start, start + length, device=q.device)[:, None]
        key = torch.arange(start + length, device=q.device)[None, :]
        mask = key <= query  # [Q, L]
        if spec.window is not None:
            mask &= key > query - spec.window
        out = attend(
            q[offset : offset + length].transpose(0, 1)[None],  # [1, H, Q, hd]
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            mask,
            spec,
        )
        outs.append(out[0].transpose(0, 1).reshape(length, -1))
        offset += length
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def window_mask(mask: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """A decode step's context mask `[B, 1, Q, L]` narrowed to each query's window; `query_positions`
    `[B, Q]`. Context column j holds position j (the cache holds a sequence's positions in order)."""
    keys = torch.arange(mask.shape[-1], device=mask.device)
    inside = keys > (query_positions[:, :, None] - window)  # [B, Q, L]
    windowed = mask & inside[:, None]
    # Padded queries (discarded later) may be left with no key; one keeps their softmax finite.
    windowed[..., 0] |= ~windowed.any(-1)
    return windowed


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    spec: AttentionSpec,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """q `[B, H, Q, hd]`, k/v `[B, KV, L, hd]` (grouped-query heads), mask True where a key is seen."""
    if spec.softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * spec.scale  # [B, H, Q, L]
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v
