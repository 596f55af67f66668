"""EAGLE-style draft speculation: one decoder layer over (hidden state, next token) pairs drafts a chain.

A Turbo adapter may carry, instead of Medusa heads (speculator.py), a one-layer draft model trained by
worker/training. With h_p the base (+LoRA) model's final-norm hidden state at position p and x_{p+1}
the token it predicted, the layer on the pair at position p is

    u = fc([h_p, E[x_{p+1}]])                                 # E: the base model's input embedding
    u = u + o_proj(attention(rope(q), rope(k), v))            # over the draft cache: pairs 0..p
    o = u + down(silu(gate(b)) * up(b)),  b = rms_norm(u)     # o drafts h_{p+1}; lm_head(o) drafts x_{p+2}

Committed pairs (h and next token both final) keep their K/V in a per-request `DraftState`; after the
last committed pair t gives draft d_1, the pairs (o_t, d_1), (o_{t+1}, d_2), ... at positions t+1, t+2,
... draft d_2, d_3, ... Their K/V go to the cache rows past the committed length, where the next
commit overwrites them: as in the paged cache, rolling back is not counting them.

Verification and acceptance are the Medusa path's (acceptance.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tuneforge.rules.artifacts import SPECULATOR_CONFIG, SPECULATOR_WEIGHTS
from tuneforge.rules.speculator import SpeculatorArchitecture, SpeculatorConfig

from worker.serving.cpu_kernels import SmallGemm
from worker.serving.draft_model import LMHead
from worker.serving.errors import AdapterLoadError
from worker.serving.linear import Linear
from worker.serving.params import SamplingParams
from worker.serving.rope import apply_rope
from worker.serving.sampling import draw, warped_probs
from worker.serving.speculator import (
    DRAFT_VOCAB_KEY,
    check_finite,
    draft_vocab,
    read_speculator_files,
)

# Far above any decoder's MLP width: a config past it is not a draft layer (and would size huge tensors).
MAX_INTERMEDIATE = 1 << 20

EAGLE_ARCHITECTURE = SpeculatorArchitecture.EAGLE
# The draft cache grows by this many positions at a time (a request rarely needs more than a few).
CACHE_CHUNK = 256


@dataclass(frozen=True)
class ModelShape:
    """What a draft layer must share with the base model: its width and its attention (RoPE) layout."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class DraftContext(Protocol):
    """The base model tensors a draft layer reads (the engine's ModelRunner)."""

    @property
    def embed(self) -> torch.Tensor: ...  # [V, D]
    @property
    def cos(self) -> torch.Tensor: ...  # [max_len, hd]
    @property
    def sin(self) -> torch.Tensor: ...
    @property
    def lm_head(self) -> LMHead: ...
    @property
    def eos_token_ids(self) -> frozenset[int] | set[int]: ...


@dataclass(eq=False)
class DraftState:
    """One request's draft cache: K/V of its committed pairs at positions 0..length-1."""

    keys: torch.Tensor  # [capacity, Hkv, hd]
    values: torch.Tensor
    length: int = 0

    def reserve(self, positions: int) -> None:
        """Room for this many positions (committed plus a proposal's temporary ones)."""
        capacity = self.keys.shape[0]
        if positions <= capacity:
            return
        grown = -(-positions // CACHE_CHUNK) * CACHE_CHUNK
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(grown, *old.shape[1:])
            new[: self.length] = old[: self.length]
            setattr(self, name, new)


@dataclass(eq=False)
class PendingPairs:
    """One request's pairs to commit this step (positions state.length onward), and whether to draft."""

    state: DraftState
    features: torch.Tensor  # [m, D] final-norm hidden states of those positions
    tokens: list[int]  # [m] the token each of them predicted (x_{p+1}), now final
    params: SamplingParams | None  # None: commit only, propose nothing this step
    generator: torch.Generator | None = None


# Drafts, and for sampled requests the distributions q `[K, V]` (CPU) they were drawn from.
Proposal = tuple[list[int], torch.Tensor | None]


@dataclass(eq=False)
class EagleDraft:
    """The draft layer's weights, q/k/v and gate/up fused, multiplied as the base model's are (linear.py:
    few-row passes through the CPU's small-step kernel, which roughly halves a chained draft pass's five
    GEMMs, or else a transposed copy). Shared by every request of an adapter; per-request state is a
    DraftState."""

    fc: Linear  # [D, 2D]
    input_norm: torch.Tensor  # [D]
    qkv: Linear  # [(Hq + 2 Hkv) hd, D]
    o: Linear  # [D, Hq hd]
    post_norm: torch.Tensor  # [D]
    gate_up: Linear  # [2I, D]
    down: Linear  # [D, I]
    shape: ModelShape
    num_heads: int  # draft depth K: drafts proposed per step
    eps: float
    draft_vocab: torch.Tensor | None = None  # [Vd] token ids, ascending
    _draft_rows: torch.Tensor | None = field(default=None, init=False, repr=False)  # [D, Vd]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in (self.fc, self.qkv, self.o, self.gate_up, self.down))

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
        kernel: SmallGemm | None = None,
        vocab_size: int | None = None,
    ) -> EagleDraft:
        config, state = read_speculator_files(directory)
        return cls.from_files(
            config, state, shape=shape, device=device, dtype=dtype, kernel=kernel, vocab_size=vocab_size
        )

    @classmethod
    def from_files(
        cls,
        config: SpeculatorConfig,
        state: dict[str, torch.Tensor],
        *,
        shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
        kernel: SmallGemm | None = None,
        vocab_size: int | None = None,
    ) -> EagleDraft:
        """A draft layer from a read config and its tensors, checked against the base model's shape."""
        _check_shape(config, shape)
        depth, eps, intermediate = _draft_layer_numbers(config)
        _check_weights(state, _expected_weights(shape, intermediate))

        def put(t: torch.Tensor) -> torch.Tensor:
            return check_finite(
                t.to(device=device, dtype=dtype).contiguous(), "the eagle draft layer's weights"
            )

        def linear(weight: torch.Tensor) -> Linear:
            return Linear(put(weight), None, kernel=kernel, transposed_copy=device.type == "cpu")

        def w(name: str) -> torch.Tensor:
            return state[f"layer.{name}.weight"]

        vocab = state.get(DRAFT_VOCAB_KEY)
        return cls(
            fc=linear(state["fc.weight"]),
            input_norm=put(w("input_norm")),
            qkv=linear(torch.cat([w("q_proj"), w("k_proj"), w("v_proj")])),
            o=linear(w("o_proj")),
            post_norm=put(w("post_norm")),
            gate_up=linear(torch.cat([w("gate_proj"), w("up_proj")])),
            down=linear(w("down_proj")),
            shape=shape,
            num_heads=depth,
            eps=eps,
            draft_vocab=draft_vocab(vocab, vocab_size, device),
        )

    def new_state(self) -> DraftState:
        cache = self.input_norm.new_empty(CACHE_CHUNK, self.shape.num_kv_heads, self.shape.head_dim)
        return DraftState(cache, torch.empty_like(cache))

    # --- the layer ---------------------------------------------------------------------------------

    def layer(
        self,
        ctx: DraftContext,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        segments: list[tuple[DraftState, int, int, int]],
    ) -> torch.Tensor:
        """The layer's outputs o `[N, D]` for pairs (features `[N, D]`, tokens `[N]`) at `positions` `[N]`.

        Rows come in segments `(state, first row, rows, first position)`, one per request: their K/V
        are written to the state's cache at those positions, and row i attends causally to the cache
        up to its own position (whatever `state.length` says; the caller decides what is committed).
        """
        n, width = features.shape
        hq, hkv, hd = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
        u = self.fc(torch.cat([features, ctx.embed.index_select(0, tokens)], -1))  # [N, D]
        a = F.rms_norm(u, (width,), self.input_norm, self.eps)
        heads = self.qkv(a).view(n, hq + 2 * hkv, hd)
        cos = ctx.cos.index_select(0, positions)[:, None, :]  # [N, 1, hd]
        sin = ctx.sin.index_select(0, positions)[:, None, :]
        rotated = heads[:, : hq + hkv]
        rotated = apply_rope(rotated, cos, sin)
        q, k, v = rotated[:, :hq], rotated[:, hq:], heads[:, hq + hkv :]
        attended = torch.empty(n, hq * hd, dtype=u.dtype, device=u.device)
        for state, row, rows, start in segments:
            end = start + rows
            state.keys[start:end] = k[row : row + rows]
            state.values[start:end] = v[row : row + rows]
            mask = None
            if rows > 1:  # query i (at position start + i) sees keys 0..start + i
                keys_at = torch.arange(end, device=u.device)[None, :]
                mask = keys_at <= (start + torch.arange(rows, device=u.device))[:, None]  # [m, L]
            out = F.scaled_dot_product_attention(
                q[row : row + rows].transpose(0, 1)[None],  # [1, Hq, m, hd]
                state.keys[:end].transpose(0, 1)[None],  # [1, Hkv, L, hd]
                state.values[:end].transpose(0, 1)[None],
                attn_mask=mask,
                scale=hd**-0.5,
                enable_gqa=True,
            )
            attended[row : row + rows] = out[0].transpose(0, 1).reshape(rows, hq * hd)
        u = u + self.o(attended)
        b = F.rms_norm(u, (width,), self.post_norm, self.eps)
        gate, up = self.gate_up(b).chunk(2, dim=-1)
        return u + self.down(F.silu(gate) * up)

    def draft_logits(self, ctx: DraftContext, outputs: torch.Tensor) -> torch.Tensor:
        """Logits `[N, V or Vd]` (float32) of draft outputs `[N, D]`: column j is draft_vocab[j]."""
        if self.draft_vocab is None:
            return ctx.lm_head(outputs).float()
        if self._draft_rows is None:  # [D, Vd]: [in, out] reads faster than [out, in] for a row
            self._draft_rows = ctx.lm_head.weight.index_select(0, self.draft_vocab).T.contiguous()
        return (outputs @ self._draft_rows).float()

    # --- one engine step ---------------------------------------------------------------------------

    def commit_and_propose(
        self, ctx: DraftContext, pending: list[PendingPairs], depth: int | None = None
    ) -> list[Proposal | None]:
        """Commits every request's new pairs in one batched layer pass, then drafts K tokens for those
        with `params` (chained steps batched across them). None for commit-only requests."""
        depth = min(depth or self.num_heads, self.num_heads)
        device = self.input_norm.device
        positions: list[int] = []
        segments = []
        for p in pending:
            rows = len(p.tokens)
            p.state.reserve(p.state.length + rows + depth)  # + the proposal's temporary rows
            segments.append((p.state, len(positions), rows, p.state.length))
            positions.extend(range(p.state.length, p.state.length + rows))
        outputs = self.layer(
            ctx,
            torch.cat([p.features for p in pending]),
            torch.tensor([t for p in pending for t in p.tokens], device=device),
            torch.tensor(positions, device=device),
            segments,
        )
        for p, (_, _, rows, _) in zip(pending, segments, strict=True):
            p.state.length += rows
        drafting = [i for i, p in enumerate(pending) if p.params is not None]
        proposals: list[Proposal | None] = [None] * len(pending)
        if not drafting:
            return proposals
        last = [segments[i][1] + segments[i][2] - 1 for i in drafting]
        drafts, probs = self._chain(
            ctx, outputs[torch.tensor(last, device=device)], [pending[i] for i in drafting], depth
        )
        for i, row_drafts, q in zip(drafting, drafts.tolist(), probs, strict=True):
            proposals[i] = (row_drafts, q)
        return proposals

    def _chain(
        self, ctx: DraftContext, outputs: torch.Tensor, pending: list[PendingPairs], depth: int
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Up to K drafts per request `[R, k <= K]` from the last committed pairs' outputs `[R, D]`, and
        the q rows `[k, V]` of sampled requests. The chain stops once every request has drafted an
        end-of-sequence token it would stop at: nothing behind one is verified (engine rule), and on the
        demo task that saved half the passes of the step before the last."""
        device = outputs.device
        drafts = torch.empty(len(pending), depth, dtype=torch.long, device=device)
        # Whether each request has drafted an EOS it stops at (one that ignores EOS never has).
        stopped = [False] * len(pending)
        stops_at_eos = [p.params is not None and not p.params.ignore_eos for p in pending]
        eos = torch.tensor(sorted(ctx.eos_token_ids), dtype=torch.long, device=device)
        sampled = [r for r, p in enumerate(pending) if p.params is not None and not p.params.greedy]
        q_rows: dict[int, list[torch.Tensor]] = {r: [] for r in sampled}
        last_position = ctx.cos.shape[0] - 1
        for j in range(depth):
            logits = self.draft_logits(ctx, outputs)  # [R, V or Vd]
            chosen = logits.argmax(-1)
            for r in sampled:
                params = pending[r].params
                assert params is not None
                q = warped_probs(logits[r : r + 1].cpu(), [params])
                chosen[r] = draw(q, [pending[r].generator])[0].to(device)
                q_rows[r].append(q[0])
            tokens = chosen if self.draft_vocab is None else self.draft_vocab[chosen]
            drafts[:, j] = tokens
            ended = torch.isin(tokens, eos).tolist()
            stopped = [s or (e and a) for s, e, a in zip(stopped, ended, stops_at_eos, strict=True)]
            if j == depth - 1 or all(stopped):
                drafts = drafts[:, : j + 1]
                break
            # Pair (o, d_{j+1}) sits at position length + j: temporary rows past the committed ones.
            starts = [p.state.length + j for p in pending]
            outputs = self.layer(
                ctx,
                outputs,
                tokens,
                torch.tensor(starts, device=device).clamp(max=last_position),  # past it: cut before verify
                [(p.state, r, 1, s) for r, (p, s) in enumerate(zip(pending, starts, strict=True))],
            )
        probs: list[torch.Tensor | None] = [None] * len(pending)
        for r in sampled:
            probs[r] = self._full_vocab(torch.stack(q_rows[r]), ctx.lm_head.weight.shape[0])
        return drafts, probs

    def _full_vocab(self, q: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """q over the whole vocabulary `[K, V]`, zero outside the draft vocabulary."""
        if self.draft_vocab is None:
            return q
        full = torch.zeros(q.shape[0], vocab_size)
        full[:, self.draft_vocab.cpu()] = q
        return full


def _draft_layer_numbers(config: SpeculatorConfig) -> tuple[int, float, int]:
    """(depth, rms_norm_eps, intermediate_size) of a stored draft layer, each within its bounds."""
    eps, intermediate = config.rms_norm_eps, config.intermediate_size
    if eps is None or intermediate is None:
        missing = "rms_norm_eps" if eps is None else "intermediate_size"
        raise AdapterLoadError(f"{SPECULATOR_CONFIG} lacks a valid {missing!r}")
    if not 0 < eps < 1 or not 0 < intermediate <= MAX_INTERMEDIATE:
        raise AdapterLoadError(f"{SPECULATOR_CONFIG}: rms_norm_eps or intermediate_size is out of range")
    return config.num_heads, eps, intermediate


def _check_weights(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the draft layer needs is stored, in this base model's shape."""
    for name, shape in expected.items():
        if name not in state:
            raise AdapterLoadError(f"{SPECULATOR_WEIGHTS} lacks {name}")
        if tuple(state[name].shape) != shape:
            raise AdapterLoadError(
                f"{SPECULATOR_WEIGHTS}: {name} is {tuple(state[name].shape)}, expected {shape} "
                "for this base model"
            )


def _check_shape(config: SpeculatorConfig, shape: ModelShape) -> None:
    found = {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
    }
    wanted = {
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
    }
    wrong = [f"{k} {found[k]} (this model: {wanted[k]})" for k in wanted if found[k] != wanted[k]]
    if wrong:
        raise AdapterLoadError(f"eagle speculator does not fit this base model: {', '.join(wrong)}")


def _expected_weights(shape: ModelShape, intermediate: int) -> dict[str, tuple[int, ...]]:
    d, q_out, kv_out = (
        shape.hidden_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
    )
    return {
        "fc.weight": (d, 2 * d),
        "layer.input_norm.weight": (d,),
        "layer.q_proj.weight": (q_out, d),
        "layer.k_proj.weight": (kv_out, d),
        "layer.v_proj.weight": (kv_out, d),
        "layer.o_proj.weight": (d, q_out),
        "layer.post_norm.weight": (d,),
        "layer.gate_proj.weight": (intermediate, d),
        "layer.up_proj.weight": (intermediate, d),
        "layer.down_proj.weight": (d, intermediate),
    }
