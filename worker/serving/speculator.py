"""Speculative decoding with a Turbo adapter's Medusa heads, and the speculator files every draft kind reads.

The heads are the training core's (worker/training/speculator.py): head k reads the final-norm hidden
state at position t and proposes the token at t + k + 2 through the base model's LM head. The next step
verifies the chain (acceptance.py says which drafts it keeps). Rejected drafts' K/V stay in the cache
beyond the sequence's length, where nothing attends to them, and are overwritten as the sequence grows:
rolling back is not counting them.

Requests with a repetition penalty do not speculate (their p would change with every accepted token).
The other kind of Turbo speculator, a one-layer draft model, is eagle.py's; it shares this verification.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tuneforge.rules.artifacts import SPECULATOR_CONFIG, SPECULATOR_WEIGHTS
from tuneforge.rules.speculator import (
    DRAFT_VOCAB_KEY,
    SpeculatorArchitecture,
    SpeculatorConfig,
    SpeculatorConfigError,
)

from worker.serving.draft_model import LMHead
from worker.serving.errors import AdapterLoadError
from worker.serving.params import SamplingParams
from worker.serving.sampling import draw, warped_probs

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURE = SpeculatorArchitecture.MEDUSA
# A config file is a few hundred bytes; anything this big is not one.
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class Speculator:
    """K residual heads `h + SiLU(W_k h + b_k)`, stacked as `[K, D, D]` / `[K, D]`.

    `draft_vocab`, when the artifact has one, is the training targets' most frequent tokens: drafts are
    chosen among them only, through the matching rows of the LM head (a sixth of smollm2's LM head at
    8192 tokens, and drafting reads it once per step). Verification always uses the whole vocabulary,
    so this changes which drafts are proposed, never what is emitted.
    """

    weight: torch.Tensor  # [K, D, D]
    bias: torch.Tensor  # [K, D]
    draft_vocab: torch.Tensor | None = None  # [Vd] token ids, ascending
    # [Vd, D]: the LM head's rows at draft_vocab, gathered at the first proposal.
    _draft_rows: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        vocab_size: int | None = None,
    ) -> Speculator:
        config, state = read_speculator_files(directory)
        return cls.from_files(
            config, state, hidden_size=hidden_size, device=device, dtype=dtype, vocab_size=vocab_size
        )

    @classmethod
    def from_files(
        cls,
        config: SpeculatorConfig,
        state: dict[str, torch.Tensor],
        *,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
        vocab_size: int | None = None,
    ) -> Speculator:
        """Heads from a read config and its tensors, checked against this engine's width."""
        if config.architecture != SUPPORTED_ARCHITECTURE or config.hidden_size != hidden_size:
            raise AdapterLoadError(
                f"speculator {config.architecture.value!r} of hidden size {config.hidden_size} does not fit "
                f"this engine ({SUPPORTED_ARCHITECTURE}, hidden size {hidden_size})"
            )
        heads = config.num_heads  # bounded by the schema
        expected = {"weight": (hidden_size, hidden_size), "bias": (hidden_size,)}
        stacked = {}
        for part, shape in expected.items():
            tensors: list[torch.Tensor] = []
            for k in range(heads):
                tensor = state.get(f"heads.{k}.linear.{part}")
                if tensor is None or tuple(tensor.shape) != shape:
                    found = "missing" if tensor is None else f"{tuple(tensor.shape)}"
                    raise AdapterLoadError(
                        f"{SPECULATOR_WEIGHTS}: heads.{k}.linear.{part} is {found}, not {shape}"
                    )
                tensors.append(tensor)
            stacked[part] = check_finite(
                torch.stack(tensors).to(device=device, dtype=dtype),
                f"speculator heads' {part}",
            )
        return cls(
            stacked["weight"],
            stacked["bias"],
            draft_vocab=draft_vocab(state.get(DRAFT_VOCAB_KEY), vocab_size, device),
        )

    def head_logits(self, hidden: torch.Tensor, lm_head: LMHead, depth: int) -> torch.Tensor:
        """Every head's logits `[N, depth, V or Vd]` (float32) for final-norm hidden states `[N, D]`:
        over the draft vocabulary when there is one (column j is token draft_vocab[j])."""
        # [N, D] x [K, D, D]^T → [N, K, D]: every head on every row in one batched GEMM.
        projected = torch.einsum("nd,ked->nke", hidden, self.weight[:depth]) + self.bias[:depth]
        heads = (hidden[:, None, :] + F.silu(projected)).reshape(-1, hidden.shape[-1])
        if self.draft_vocab is None:
            logits = lm_head(heads)
        else:
            if self._draft_rows is None:
                self._draft_rows = lm_head.weight.index_select(0, self.draft_vocab).contiguous()
            logits = F.linear(heads, self._draft_rows)
        return logits.float().view(hidden.shape[0], depth, -1)

    def propose(self, hidden: torch.Tensor, lm_head: LMHead, depth: int) -> torch.Tensor:
        """Greedy drafts `[N, depth]` (token ids) from final-norm hidden states `[N, D]` (depth <= K)."""
        best = self.head_logits(hidden, lm_head, depth).argmax(-1)
        return best if self.draft_vocab is None else self.draft_vocab[best]

    def propose_sampled(
        self,
        hidden: torch.Tensor,
        lm_head: LMHead,
        params: SamplingParams,
        generator: torch.Generator | None,
        depth: int | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """Drafts drawn from each head's processed distribution q, and q itself `[depth, V]` (CPU); with a
        draft vocabulary q is zero outside it (rejection sampling only needs q(draft) > 0)."""
        depth = depth or self.num_heads
        logits = self.head_logits(hidden, lm_head, depth)[0].cpu()  # [depth, V or Vd]
        q = warped_probs(logits, [params] * depth)
        drawn = draw(q, [generator] * depth)
        if self.draft_vocab is None:
            return [int(t) for t in drawn], q
        vocab = self.draft_vocab.cpu()
        full = torch.zeros(depth, lm_head.weight.shape[0])
        full[:, vocab] = q
        return [int(t) for t in vocab[drawn]], full


def read_speculator_config(directory: Path) -> SpeculatorConfig:
    """The adapter's speculator config, by the schema training writes it with; a missing, oversized or
    invalid one refuses the load, naming the field."""
    try:
        if (directory / SPECULATOR_CONFIG).stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterLoadError(f"{SPECULATOR_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
        raw = json.loads((directory / SPECULATOR_CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("speculator config in %s cannot be read: %s", directory, exc)
        raise AdapterLoadError("the speculator files cannot be read (not JSON / safetensors)") from None
    try:
        return SpeculatorConfig.parse(raw)
    except SpeculatorConfigError as exc:
        raise AdapterLoadError(str(exc)) from None


def read_speculator_files(directory: Path) -> tuple[SpeculatorConfig, dict[str, torch.Tensor]]:
    """The speculator's config and its tensors (speculator.safetensors), of either kind."""
    config = read_speculator_config(directory)
    try:
        state = load_file(directory / SPECULATOR_WEIGHTS)
    except (OSError, ValueError) as exc:
        log.warning("speculator weights in %s cannot be read: %s", directory, exc)
        raise AdapterLoadError("the speculator files cannot be read (not JSON / safetensors)") from None
    return config, state


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor, if every value is finite in the dtype it is served in; else the load is refused."""
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterLoadError(f"{what} hold NaN or infinite values")
    return tensor


def draft_vocab(
    ids: torch.Tensor | None, vocab_size: int | None, device: torch.device
) -> torch.Tensor | None:
    """A speculator's draft vocabulary `[Vd]` (ascending token ids), checked to index the LM head."""
    if ids is None:
        return None
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise AdapterLoadError(f"{SPECULATOR_WEIGHTS}: {DRAFT_VOCAB_KEY} must be a 1-d list of token ids")
    limit = vocab_size if vocab_size is not None else torch.iinfo(torch.long).max
    if int(ids.min()) < 0 or int(ids.max()) >= limit:
        raise AdapterLoadError(f"{SPECULATOR_WEIGHTS}: {DRAFT_VOCAB_KEY} holds ids outside [0, {limit})")
    return ids.to(device=device, dtype=torch.long)
