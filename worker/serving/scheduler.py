"""Continuous batching: which sequences run this step, admitted and retired step by step.

Every step either prefills newly admitted sequences (admission is checked every step, so a request
joins as soon as a slot and KV blocks are free) or decodes one token for every running sequence.
When the KV cache cannot give a running sequence its next slot, the most recently admitted one is
preempted: its blocks are freed and it is recomputed later from its prompt and output so far.

With prefix caching, an admitted sequence that `may_reuse` its cached prefix shares those blocks and
prefills only the rest (a recomputed one may find its own blocks still cached); the step's token
budget counts only what is computed.

With chunked prefill, `max_prefill_tokens` is the whole step's token budget: a step feeds every running
sequence's next token and spends what is left on prefill chunks (sequences mid-prompt first, then new
admissions), so running streams keep producing tokens while a long prompt joins over several steps.
A chunk feeds tokens [num_cached, end) against the sequence's cached context (`step_ends`); only a
chunk that reaches the end of the sequence yields a token. Steps with no chunk are plain decode steps.
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
        chunked_prefill: bool = False,
        may_chunk: Callable[[Sequence], bool] = lambda seq: True,
    ) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.is_ready = is_ready  # False while the sequence's adapter is still loading
        self.may_reuse = may_reuse  # whether a sequence may start from its cached prefix blocks
        self.chunked_prefill = chunked_prefill
        self.may_chunk = may_chunk  # False: its prompt is prefilled in one step (prompt logprobs)
        self.step_ends: list[int] | None = None  # a chunked step's end position of each sequence's feed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or any(self.is_ready(seq) for seq in self.waiting)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step, and whether it is a prefill step."""
        self.step_ends = None
        if self.chunked_prefill:
            return self._schedule_chunked()
        admitted = self._admit()
        if admitted:
            return admitted, True
        return self._decodable(), False

    def _schedule_chunked(self) -> tuple[list[Sequence], bool]:
        """Every running sequence's next token, and prefill chunks within the rest of the budget."""
        running = self._decodable()  # slots for the next token; preempts the newest when short
        budget = self.max_prefill_tokens - sum(1 for seq in running if _pending(seq) == 1)
        seqs: list[Sequence] = []
        ends: list[int] = []
        chunked = False
        for seq in running:
            pending = _pending(seq)
            if pending > 1 and not self.may_chunk(seq):
                take = pending  # a prompt that must be prefilled whole runs alone if it must
            else:
                take = min(pending, max(budget, 0)) if pending > 1 else 1
            if take == 0:
                continue  # no budget left for its next chunk: it waits a step, holding its blocks
            budget -= take if pending > 1 else 0
            chunked = chunked or pending > 1
            seqs.append(seq)
            ends.append(seq.num_cached + take)
        for seq in self._admit(budget=budget, partial=True):
            take = len(seq) - seq.num_cached
            if self.may_chunk(seq):
                take = min(take, max(budget, 1))
            budget -= take
            chunked = True
            seqs.append(seq)
            ends.append(seq.num_cached + take)
        if not chunked:
            return seqs, False
        self.step_ends = ends
        return seqs, True

    def _admit(self, budget: int | None = None, *, partial: bool = False) -> list[Sequence]:
        """Admit waiting sequences within `budget` tokens; `partial`: one needs only a chunk's budget."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens if budget is None else budget
        if partial and budget <= 0:
            return admitted
        skipped: list[Sequence] = []
        # One free block per running sequence stays in reserve so admitting never starves decoding.
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.is_ready(seq):
                skipped.append(self.waiting.popleft())  # its adapter loads; later arrivals go ahead
                continue
            reuse = self.may_reuse(seq)
            chunkable = partial and self.may_chunk(seq)
            too_big = (admitted and len(seq) > budget and not chunkable) or (chunkable and budget <= 0)
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
            if partial and budget <= 0:
                break
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


def _pending(seq: Sequence) -> int:
    """Tokens of the sequence not in the cache: 1 for a decoding one, more while its prompt is prefilled."""
    return len(seq) - seq.num_cached
