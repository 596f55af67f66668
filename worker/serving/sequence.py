"""One request inside the engine: its tokens, its adapter, its KV blocks and where it is in its life."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from worker.serving.params import SamplingParams


class SequenceStatus(enum.StrEnum):
    """WAITING (queued, or preempted and to be recomputed) → RUNNING → FINISHED.

    A waiting sequence whose adapter is still loading stays WAITING and is skipped by the scheduler.
    """

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


def next_sequence_id() -> int:
    """Unique per process; taken by the caller's thread so it can abort before the engine sees it."""
    return next(_ids)


@dataclass(eq=False)
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_key: str | None = None  # the adapter cache's key (tenant-qualified), None = base model
    seq_id: int = field(default_factory=next_sequence_id)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose keys/values are in the cache; the rest of `all_token_ids` is fed at the next step.
    num_cached: int = 0
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    # Choices still to fork from this sequence once its prompt is prefilled (a request's n - 1): the
    # scheduler keeps batch slots and KV blocks for them when it admits the sequence.
    forks: int = 0
    last_token_time: float | None = None
    # Prefix caching (kv_cache.BlockManager): the chained hashes of its full blocks computed so far, and
    # how many of its block table's first blocks are registered (or known to be) for reuse.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def reset_for_recompute(self) -> None:
        """Preempted: its cache is gone, so prompt and output so far are prefilled again later."""
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.num_cached = 0
        self.num_registered = 0
