"""Owns the EAGLE-style Turbo speculator: a one-layer draft model that reads the target's own features.

Medusa heads (speculator.py) guess each of the next K tokens from one hidden state, blind to what the
other heads guessed and to the prompt. This draft model is one decoder layer of the base model's
shape that runs autoregressively over *pairs* (h_p, x_{p+1}): h_p is the target's final-norm hidden
state at position p (what the LM head reads to predict x_{p+1}) and x_{p+1} the token that followed.

    u = fc([h_p ; E[x_{p+1}]])                  E: the base model's input embedding (frozen, shared)
    u = u + attn(rms_norm(u))                    causal over earlier pairs; RoPE at position p
    o = u + mlp(rms_norm(u))                     o: the draft's guess of h_{p+1}
    logits = lm_head(o)                          the base model's LM head (frozen, shared)

Serving (worker/serving/eagle.py) commits a pair for every verified position and drafts by feeding
its own outputs back: (o_t, d_1) at t + 1 gives d_2, and so on. Because it attends over the whole
context it can copy from the prompt, and each draft conditions on the drafts before it.

Training uses "training-time test" (EAGLE-3): pass 0 runs on the true pairs; pass j at position i
takes pass j - 1's output at i - 1 as its feature and attends to the true pairs up to i - j plus the
chain of passes 1..j before it, exactly what the j + 1-th draft of a step sees when serving. Pass j
at i predicts x_{i+2}, the token Medusa head j predicts from position i - j, so the per-depth stats
(HeadStats) mean the same for both kinds. The features are detached: drafting never changes the
model's own weights (turbo_lora's LoRA learns from its LM loss alone).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tuneforge.rules.speculator import SpeculatorArchitecture

from worker.training.data import IGNORE_INDEX
from worker.training.speculator import HeadStats, SpeculatorConfig, SpeculatorFiles

ARCHITECTURE = SpeculatorArchitecture.EAGLE


class EagleDraft(SpeculatorFiles):
    """fc [D, 2D] and one Llama-style decoder layer shaped like the base model's layers (fp32)."""

    def __init__(self, config: SpeculatorConfig) -> None:
        super().__init__(config)
        d, hd = config.hidden_size, int(config.head_dim or 0)
        hq, hkv = int(config.num_attention_heads or 0), int(config.num_key_value_heads or 0)
        inner = int(config.intermediate_size or 0)
        if not (hd and hq and hkv and inner) or hq % hkv:
            raise ValueError(f"an eagle draft needs the base model's attention and MLP shape, got {config}")
        self.fc = torch.nn.Linear(2 * d, d, bias=False)
        self.layer = _DraftLayer(d, hq * hd, hkv * hd, inner)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """fc passes the feature through ([I 0]); the layer's output projections start at zero, so an
        untrained draft predicts from h_p itself (the LM head's own next token, one position early)."""
        d = self.config.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, :d] = torch.eye(d)
        for linear in (self.layer.q_proj, self.layer.k_proj, self.layer.v_proj, self.layer.gate_proj,
                       self.layer.up_proj):  # fmt: skip
            torch.nn.init.normal_(linear.weight, std=0.02)
        torch.nn.init.zeros_(self.layer.o_proj.weight)
        torch.nn.init.zeros_(self.layer.down_proj.weight)

    @property
    def depth(self) -> int:
        return self.config.num_heads

    # --- the layer ---------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, float(self.config.rms_norm_eps or 1e-5))

    def _qkv(
        self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, D] → q [B, Hq, S, hd], k and v [B, Hq, S, hd] (kv heads repeated), RoPE applied."""
        config, layer = self.config, self.layer
        b, s, _ = u.shape
        hd, hq, hkv = (
            int(config.head_dim or 0),
            int(config.num_attention_heads or 0),
            int(config.num_key_value_heads or 0),
        )
        a = self._rms(u, layer.input_norm.weight)
        q = layer.q_proj(a).view(b, s, hq, hd).transpose(1, 2)
        k = layer.k_proj(a).view(b, s, hkv, hd).transpose(1, 2)
        v = layer.v_proj(a).view(b, s, hkv, hd).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        # GQA: each kv head serves hq // hkv query heads (expand, whose backward is a plain sum).
        def widen(x: torch.Tensor) -> torch.Tensor:
            return x[:, :, None].expand(b, hkv, hq // hkv, s, hd).reshape(b, hq, s, hd)

        return q, widen(k), widen(v)

    def _finish(self, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the MLP: [B, S, D]."""
        layer = self.layer
        b, _, s, _ = attn.shape
        u = u + layer.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        x = self._rms(u, layer.post_norm.weight)
        return u + layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))

    # --- training-time test -------------------------------------------------------------------------

    def unroll(
        self,
        features: torch.Tensor,
        next_embeds: torch.Tensor,
        segments: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Outputs o [B, S, D] of passes 0..K-1 (module docstring). features: h [B, S, D] (fp32,
        detached); next_embeds: E[x_{p+1}] [B, S, D]; segments: [B, S] example ids (packed rows)."""
        s = features.shape[1]
        scale = float(self.config.head_dim or 1) ** -0.5
        index = torch.arange(s, device=features.device)
        same = segments[:, :, None] == segments[:, None, :]  # [B, S, S]
        outputs: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []  # per pass, [B, H, S, hd]
        values: list[torch.Tensor] = []
        feature = features
        for j in range(self.depth):
            if j:  # pass j's feature at i is pass j-1's output at i-1 (its guess of h_i)
                feature = F.pad(outputs[-1][:, :-1], (0, 0, 1, 0))
            u = self.fc(torch.cat([feature, next_embeds], -1))
            q, k, v = self._qkv(u, cos, sin)
            keys.append(k)
            values.append(v)
            # True pairs up to i - j (same example), then one key per chained pass m at i - j + m.
            visible = (index[None, :] <= index[:, None] - j)[None] & same  # [B, S, S]
            scores = [(q @ keys[0].transpose(-1, -2)) * scale]  # [B, H, S, S]
            scores[0] = scores[0].masked_fill(~visible[:, None], float("-inf"))
            chained_v = []
            for m in range(1, j + 1):
                shift = j - m  # key/value of pass m at i - shift
                km = F.pad(keys[m][:, :, : s - shift], (0, 0, shift, 0))
                vm = F.pad(values[m][:, :, : s - shift], (0, 0, shift, 0))
                scores.append(((q * km).sum(-1) * scale)[..., None])  # [B, H, S, 1]
                chained_v.append(vm)
            weights = torch.softmax(torch.cat(scores, -1).float(), -1).to(q.dtype)
            attn = weights[..., :s] @ values[0]
            for m, vm in enumerate(chained_v):
                attn = attn + weights[..., s + m, None] * vm
            outputs.append(self._finish(u, attn))
        return outputs


class _DraftLayer(torch.nn.Module):
    """A Llama decoder layer's weights, named as the serving side reads them (`layer.<name>.weight`)."""

    def __init__(self, d: int, q_width: int, kv_width: int, inner: int) -> None:
        super().__init__()
        self.input_norm = _Norm(d)
        self.q_proj = torch.nn.Linear(d, q_width, bias=False)
        self.k_proj = torch.nn.Linear(d, kv_width, bias=False)
        self.v_proj = torch.nn.Linear(d, kv_width, bias=False)
        self.o_proj = torch.nn.Linear(q_width, d, bias=False)
        self.post_norm = _Norm(d)
        self.gate_proj = torch.nn.Linear(d, inner, bias=False)
        self.up_proj = torch.nn.Linear(d, inner, bias=False)
        self.down_proj = torch.nn.Linear(inner, d, bias=False)


class _Norm(torch.nn.Module):
    """An RMSNorm's weight (saved as `<name>.weight`, as the serving side reads it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def draft_losses(
    draft: EagleDraft,
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    segments: torch.Tensor,
    *,
    input_ids: torch.Tensor,
    embed: torch.nn.Module,
    rotary: Any,
    position_ids: torch.Tensor | None,
) -> HeadStats:
    """Per depth j the summed cross-entropy of pass j over its valid targets (x_{i+2} = targets[i+1]
    where positions i - j .. i + 1 share an example) and its top-1 hits; the same stats as Medusa's."""
    b, s, _ = hidden.shape
    device = hidden.device
    features = hidden.detach().float()
    nxt = F.pad(input_ids[:, 1:], (0, 1))  # x_{p+1}; the last position's pair is never used
    with torch.no_grad():
        next_embeds = embed(nxt).float()
        positions = position_ids if position_ids is not None else torch.arange(s, device=device)[None]
        cos, sin = rotary(features, positions.expand(b, s))
    outputs = draft.unroll(features, next_embeds, segments, cos.float(), sin.float())
    later = F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, S] x_{i+2}
    seg_later = F.pad(segments[:, 1:], (0, 1), value=-1)
    rows, lookup = draft.vocab_rows(lm_head)
    stats = HeadStats()
    for j, output in enumerate(outputs):
        seg_back = F.pad(segments[:, : s - j], (j, 0), value=-1)  # segment of i - j (-1 before the row)
        valid = (later != IGNORE_INDEX) & (seg_later == segments) & (seg_back == segments)
        labels = later[valid]
        if lookup is not None:
            labels = lookup[labels]  # index in the draft vocabulary, -1 outside it
            keep = labels >= 0
            labels, picked = labels[keep], output[valid][keep]
        else:
            picked = output[valid]
        if not labels.numel():
            stats.loss_sums.append(hidden.new_zeros((), dtype=torch.float32))
            stats.correct.append(0)
            stats.counts.append(0)
            continue
        logits = F.linear(picked, rows).float()  # [N, Vd or V]
        stats.loss_sums.append(F.cross_entropy(logits, labels, reduction="sum"))
        stats.correct.append(int((logits.detach().argmax(-1) == labels).sum()))
        stats.counts.append(int(valid.sum()))  # out-of-vocabulary targets count as misses
    return stats
