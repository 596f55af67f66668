"""`EngineRequest`: the engine thread's view of one request, its sequence, adapter, drafts and outputs."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from dataclasses import dataclass, field

import torch

from worker.serving.adapters import ResolvedAdapter
from worker.serving.detokenizer import IncrementalDetokenizer
from worker.serving.eagle import DraftState
from worker.serving.guided import GuideState
from worker.serving.lora import AdapterWeights
from worker.serving.outputs import SpeculationStats, TokenOutput
from worker.serving.sequence import Sequence


@dataclass(eq=False)
class EngineRequest:
    """The engine thread's view of one request: its sequence and where its tokens go."""

    seq: Sequence
    detok: IncrementalDetokenizer
    deliver: queue.SimpleQueue[TokenOutput | BaseException] | None = None
    adapter_ref: ResolvedAdapter | None = None  # what the request's adapter id resolved to
    async_deliver: tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput | BaseException]] | None = None
    adapter: AdapterWeights | None = None
    # Proposed by the adapter's speculator and verified at the next step; for sampled requests also
    # the distributions they were drawn from (the rejection rule needs them).
    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    speculation: SpeculationStats | None = None  # counted from its first verification step
    draft_state: DraftState | None = None  # an eagle speculator's draft cache, rebuilt at each prefill
    guide: GuideState | None = None  # where the output stands in its grammar, for a constrained request
    # The prompt's logprobs went out with the first token: a recompute after preemption scores it no more.
    prompt_scored: bool = False
    # n > 1: this request's choice index, and the id of its family (the parent's seq_id) for aborts.
    choice: int = 0
    family_id: int | None = None
    # The parent's pending forks: the generator each will draw from (choice 1..n-1), and the first
    # token each drew from the parent's prefill logits, set by the step that prefilled it.
    fork_generators: list[torch.Generator | None] = field(default_factory=list)
    fork_firsts: list[tuple[int, float]] = field(default_factory=list)

    def send(self, item: TokenOutput | BaseException) -> None:
        if self.async_deliver is not None:
            loop, q = self.async_deliver
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits for it
                loop.call_soon_threadsafe(q.put_nowait, item)
        elif self.deliver is not None:
            self.deliver.put(item)
