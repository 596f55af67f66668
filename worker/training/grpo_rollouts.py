"""What GRPO asks of whoever samples its rollouts (`RolloutSampler`; worker/rollouts.py runs the serving
engine), and the types that cross that boundary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class RolloutParams:
    """How completions are sampled; temperature 0 is greedy."""

    temperature: float
    top_p: float
    top_k: int | None
    max_tokens: int


@dataclass(frozen=True)
class AdapterSnapshot:
    """The adapter being trained, as a sampler loads it: its PEFT config (JSON) and weights (PEFT's
    state-dict names, host tensors)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the sampled tokens (an end-of-sequence token included when one ended it)
    logprobs: list[float]  # each token's logprob under the sampling policy (the raw distribution)


class RolloutSampler(Protocol):
    """Samples completions with the base model plus an adapter; implemented by worker/rollouts.py."""

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: RolloutParams,
        seed: int,
        adapter: AdapterSnapshot | None,
    ) -> list[list[Completion]]:
        """`n` completions of each prompt (`adapter` None: the base model), reproducible for a seed."""
        ...
