"""The paged KV cache: fixed-size blocks in one preallocated pool per layer, sized from a byte budget.

Paged rather than one max-length slot per sequence: with a 2048-token context and typical 100-token
requests, slots would reserve ~20x what is used; blocks of 16 tokens waste at most 15 per sequence.
The block manager refuses to admit what does not fit; a sequence that cannot grow is preempted
(recomputed later) by the scheduler, never crashes the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.serving.sequence import Sequence

BLOCK_SIZE = 16


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element  # keys and values


class KVCache:
    """Per layer, keys and values as `[num_blocks * BLOCK_SIZE, kv_heads, head_dim]` (slot = block*16+i)."""

    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device | None = None) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        slots = num_blocks * BLOCK_SIZE
        self.keys = [
            torch.zeros(slots, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @staticmethod
    def blocks_for_budget(shape: CacheShape, budget_bytes: int) -> int:
        return budget_bytes // (shape.bytes_per_token * BLOCK_SIZE)


class BlockManager:
    """Which blocks are free; `can_*` answers before anything is changed, so nothing half-allocates."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @staticmethod
    def blocks_needed(num_tokens: int) -> int:
        return -(-num_tokens // BLOCK_SIZE)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Room for every token of the sequence so far, keeping `reserve` blocks free."""
        return self.blocks_needed(len(seq)) + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, "allocate() is for a sequence without blocks"
        need = self.blocks_needed(len(seq))
        seq.block_table = [self._free.pop() for _ in range(need)]

    def can_append(self, seq: Sequence) -> bool:
        return self._has_room(seq) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the token fed at the next decode step (position len(seq) - 1) has a slot."""
        if not self._has_room(seq):
            seq.block_table.append(self._free.pop())

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Slots for `tokens` positions (drafts beyond the next token); False, changing nothing, if short."""
        need = self.blocks_needed(tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        seq.block_table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []

    @staticmethod
    def _has_room(seq: Sequence) -> bool:
        return len(seq) <= len(seq.block_table) * BLOCK_SIZE

    @staticmethod
    def slot(seq: Sequence, position: int) -> int:
        return seq.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
