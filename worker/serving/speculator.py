"""Speculative decoding with a Turbo adapter's Medusa heads: propose a chain of draft tokens, verify
them all in the next forward pass, keep the longest prefix the model itself would have produced.

The heads are the training core's (worker/training/speculator.py): head k reads the final-norm hidden
state at position t and proposes the token at t + k + 2 through the base model's LM head. One step of
a speculating sequence feeds its last emitted token plus the K drafts; the logits at those K + 1
positions say what greedy decoding would emit after each prefix, so

    accepted = longest a such that drafts[:a] == argmax(logits[:a])
    emitted  = drafts[:a] + [argmax(logits[a])]          # always at least one token

which is token for token what non-speculative greedy decoding produces. Rejected drafts' K/V stay in
the cache beyond the sequence's length, where nothing attends to them, and are overwritten as the
sequence grows: rolling back is not counting them. Sampled requests do not speculate (yet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from worker.serving.errors import AdapterLoadError
from worker.serving.params import SamplingParams

if TYPE_CHECKING:
    from worker.serving.lora import AdapterWeights

SPECULATOR_WEIGHTS = "speculator.safetensors"
SPECULATOR_CONFIG = "speculator_config.json"
SUPPORTED_ARCHITECTURE = "medusa_residual_silu"


@dataclass
class Speculator:
    """K residual heads `h + SiLU(W_k h + b_k)`, stacked as `[K, D, D]` / `[K, D]`."""

    weight: torch.Tensor  # [K, D, D]
    bias: torch.Tensor  # [K, D]

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def load(
        cls, directory: Path, *, hidden_size: int, device: torch.device, dtype: torch.dtype
    ) -> Speculator:
        try:
            config = json.loads((directory / SPECULATOR_CONFIG).read_text())
            state = load_file(directory / SPECULATOR_WEIGHTS)
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"the speculator files cannot be read ({exc})") from exc
        if config.get("architecture") != SUPPORTED_ARCHITECTURE or config.get("hidden_size") != hidden_size:
            raise AdapterLoadError(
                f"speculator {config.get('architecture')!r} of hidden size {config.get('hidden_size')} "
                f"does not fit this engine ({SUPPORTED_ARCHITECTURE}, hidden size {hidden_size})"
            )
        heads = int(config["num_heads"])
        try:
            weight = torch.stack([state[f"heads.{k}.linear.weight"] for k in range(heads)])
            bias = torch.stack([state[f"heads.{k}.linear.bias"] for k in range(heads)])
        except KeyError as exc:
            raise AdapterLoadError(f"speculator.safetensors lacks {exc}") from exc
        return cls(weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype))

    def propose(self, hidden: torch.Tensor, lm_head: torch.nn.Module | object, depth: int) -> torch.Tensor:
        """Greedy drafts `[N, depth]` from final-norm hidden states `[N, D]` (depth <= num_heads)."""
        # [N, 1, D] x [K, D, D]^T → [N, K, D]: every head on every row in one batched GEMM.
        projected = torch.einsum("nd,ked->nke", hidden, self.weight[:depth]) + self.bias[:depth]
        heads = hidden[:, None, :] + F.silu(projected)
        logits = lm_head(heads.reshape(-1, heads.shape[-1]))  # type: ignore[operator]
        return logits.argmax(-1).view(hidden.shape[0], depth)


def speculates(params: SamplingParams, adapter: AdapterWeights | None) -> bool:
    """Greedy requests whose adapter has heads; sampled or penalised ones decode one token a step."""
    return (
        adapter is not None
        and adapter.speculator is not None
        and params.greedy
        and params.repetition_penalty == 1.0
    )


def has_speculator(directory: Path) -> bool:
    return (directory / SPECULATOR_WEIGHTS).is_file() and (directory / SPECULATOR_CONFIG).is_file()


def accept_greedy(drafts: list[int], verified: list[int]) -> list[int]:
    """The tokens a speculating step emits: the drafts greedy decoding confirms, then its own next token.

    `verified[i]` is the model's greedy token after the prefix ending at draft i - 1 (len(drafts) + 1
    of them).
    """
    emitted = []
    for draft, model_choice in zip(drafts, verified, strict=False):
        if draft != model_choice:
            break
        emitted.append(draft)
    emitted.append(verified[len(emitted)])
    return emitted
