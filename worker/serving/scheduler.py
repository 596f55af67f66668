"""Continuous batching: which sequences run this step, admitted and retired step by step.

Every step either prefills newly admitted sequences (admission is checked every step, so a request
joins as soon as a slot and KV blocks are free) or decodes one token for every running sequence.
When the KV cache cannot give a running sequence its next slot, the most recently admitted one is
preempted: its blocks are freed and it is recomputed later from its prompt and output so far.

With prefix caching, an admitted sequence that `may_reuse` its cached prefix shares those blocks and
prefills only the rest (a recomputed one may find its own blocks still cached); the step's token
budget counts only what is computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.serving.kv_cache import BlockManager
from worker.serving.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_batch_size: int,
        max_prefill_tokens: int,
        is_ready: Callable[[Sequence], bool],
        may_reuse: Callable[[Sequence], bool] = lambda seq: False,
    ) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.is_ready = is_ready  # False while the sequence's adapter is still loading
        self.may_reuse = may_reuse  # whether a sequence may start from its cached prefix blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or any(self.is_ready(seq) for seq in self.waiting)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step, and whether it is a prefill step."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        return self._decodable(), False

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        skipped: list[Sequence] = []
        # One free block per running sequence stays in reserve so admitting never starves decoding.
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.is_ready(seq):
                skipped.append(self.waiting.popleft())  # its adapter loads; later arrivals go ahead
                continue
            reuse = self.may_reuse(seq)
            too_big = admitted and len(seq) > budget
            # A request of n choices takes n slots once forked (n is at most half the batch), and a
            # block per fork for its copy of the prompt's last block.
            too_wide = self.running and len(self.running) + 1 + seq.forks > self.max_batch_size
            if (
                too_big
                or too_wide
                or not self.blocks.can_allocate(seq, reserve=len(self.running) + seq.forks, reuse=reuse)
            ):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, reuse=reuse)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= len(seq) - seq.num_cached
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def _decodable(self) -> list[Sequence]:
        """Running sequences that got a slot for their next token, preempting the newest if needed."""
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.pop(0)
            while not self.blocks.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.append_slot(seq)
                scheduled.append(seq)
        self.running = scheduled
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished, failed or aborted) wherever it is; its blocks are free at once."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.free(seq)
