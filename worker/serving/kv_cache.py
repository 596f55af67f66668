"""The paged KV cache: fixed-size blocks in one preallocated pool per layer, sized from a byte budget.

Paged rather than one max-length slot per sequence: with a 2048-token context and typical 100-token
requests, slots would reserve ~20x what is used; blocks of 16 tokens waste at most 15 per sequence.
The block manager refuses to admit what does not fit; a sequence that cannot grow is preempted
(recomputed later) by the scheduler, never crashes the engine.

A request with n choices is prefilled once and forked (`BlockManager.fork`): the forks share the
prompt's full blocks (counted by holders; a block is free when its last holder frees it) and get their
own copy of its last, partial block, the only one they and the parent would both write into.
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

    def copy_block(self, source: int, target: int) -> None:
        """Block `target` takes block `source`'s keys and values in every layer."""
        src = slice(source * BLOCK_SIZE, (source + 1) * BLOCK_SIZE)
        dst = slice(target * BLOCK_SIZE, (target + 1) * BLOCK_SIZE)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst] = keys[src]
            values[dst] = values[src]

    @staticmethod
    def blocks_for_budget(shape: CacheShape, budget_bytes: int) -> int:
        return budget_bytes // (shape.bytes_per_token * BLOCK_SIZE)


class BlockManager:
    """Which blocks are free; `can_*` answers before anything is changed, so nothing half-allocates."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._holders = [0] * num_blocks  # sequences whose block table holds each block

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
        seq.block_table = [self._take() for _ in range(need)]

    def can_append(self, seq: Sequence) -> bool:
        return self._has_room(seq) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the token fed at the next decode step (position len(seq) - 1) has a slot."""
        if not self._has_room(seq):
            seq.block_table.append(self._take())

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Slots for `tokens` positions (drafts beyond the next token); False, changing nothing, if short."""
        need = self.blocks_needed(tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def fork(self, parent: Sequence, child: Sequence, cache: KVCache) -> None:
        """`child` (a fork of `parent` right after its prefill, sharing its first `num_tokens` positions)
        shares the parent's full blocks and gets a copy of the partial last one; needs one free block."""
        assert not child.block_table, "fork() is for a sequence without blocks"
        tokens = child.num_cached
        full = tokens // BLOCK_SIZE
        shared = parent.block_table[:full]
        for block in shared:
            self._holders[block] += 1
        child.block_table = list(shared)
        if tokens % BLOCK_SIZE:
            if not self._free:
                raise RuntimeError("no free KV block for a fork's copy of its parent's last block")
            copy = self._take()
            cache.copy_block(parent.block_table[full], copy)
            child.block_table.append(copy)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)
        seq.block_table = []

    def _take(self) -> int:
        block = self._free.pop()
        self._holders[block] = 1
        return block

    @staticmethod
    def _has_room(seq: Sequence) -> bool:
        return len(seq) <= len(seq.block_table) * BLOCK_SIZE

    @staticmethod
    def slot(seq: Sequence, position: int) -> int:
        return seq.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
