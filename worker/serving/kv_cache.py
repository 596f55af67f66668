"""The paged KV cache: fixed-size blocks in one preallocated pool per layer, sized from a byte budget.

Paged rather than one max-length slot per sequence: with a 2048-token context and typical 100-token
requests, slots would reserve ~20x what is used; blocks of 16 tokens waste at most 15 per sequence.
The block manager refuses to admit what does not fit; a sequence that cannot grow is preempted
(recomputed later) by the scheduler, never crashes the engine.

A request with n choices is prefilled once and forked (`BlockManager.fork`): the forks share the
prompt's full blocks (counted by holders; a block is free when its last holder frees it) and get their
own copy of its last, partial block, the only one they and the parent would both write into.

Prefix caching (`BlockManager(prefix_caching=True)`): a full block whose keys and values are computed is
registered under a chained digest of (the previous block's, its 16 token ids, the sequence's adapter
key and tenant scope), so different adapters and different tenants never share KV. Admitting a
sequence reuses the longest run of its full blocks found registered (one more holder each) and only
the rest is prefilled. A registered block whose last holder frees it stays registered and evictable
(least recently freed first) until its slot is needed. Sharing needs no copy-on-write: only a
sequence's partial last block is ever written, and
registered blocks are full.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
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

    def __init__(
        self,
        num_blocks: int,
        *,
        prefix_caching: bool = False,
        on_lookup: Callable[[int, int], None] | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.on_lookup = on_lookup  # (tokens looked up, tokens found cached), for the hit-rate metrics
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._holders = [0] * num_blocks  # sequences whose block table holds each block
        self._hash_of: list[bytes | None] = [None] * num_blocks  # a registered block's hash
        self._by_hash: dict[bytes, int] = {}  # hash -> registered block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, no holder; oldest first

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: never used, or cached with no holder (evicted when taken)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered for prefix reuse (held or evictable)."""
        return len(self._by_hash)

    @staticmethod
    def blocks_needed(num_tokens: int) -> int:
        return -(-num_tokens // BLOCK_SIZE)

    def can_allocate(self, seq: Sequence, reserve: int = 0, *, reuse: bool = False) -> bool:
        """Room for every token of the sequence so far, keeping `reserve` blocks free; with `reuse`, its
        cached prefix blocks count as found (an evictable one stops being free once held)."""
        hits = self._lookup(seq) if reuse else []
        revived = sum(1 for block in hits if self._holders[block] == 0)
        return self.blocks_needed(len(seq)) - len(hits) + revived + reserve <= self.num_free

    def allocate(self, seq: Sequence, *, reuse: bool = False) -> None:
        """Blocks for every token so far; with `reuse` (and prefix caching on), the cached run of its
        full blocks is shared and `seq.num_cached` says how many tokens need no prefill."""
        assert not seq.block_table, "allocate() is for a sequence without blocks"
        hits = self._lookup(seq) if reuse else []
        if reuse and self.prefix_caching and self.on_lookup is not None:
            self.on_lookup(len(seq), len(hits) * BLOCK_SIZE)
        for block in hits:
            if self._holders[block] == 0:
                del self._evictable[block]
            self._holders[block] += 1
        need = self.blocks_needed(len(seq)) - len(hits)
        seq.block_table = hits + [self._take() for _ in range(need)]
        seq.num_cached = len(hits) * BLOCK_SIZE
        seq.num_registered = len(hits)

    def register(self, seq: Sequence, computed: int) -> None:
        """Register the sequence's full blocks among its first `computed` positions, whose keys and
        values a step just wrote (right after the forward pass: a request may finish at its token)."""
        if not self.prefix_caching:
            return
        full = min(computed // BLOCK_SIZE, len(seq.block_table))
        if full <= seq.num_registered:
            return
        hashes = self._hashes(seq, full)
        for index in range(seq.num_registered, full):
            block, key = seq.block_table[index], hashes[index]
            if self._hash_of[block] is None and key not in self._by_hash:
                self._hash_of[block] = key
                self._by_hash[key] = block
        seq.num_registered = full

    def _lookup(self, seq: Sequence) -> list[int]:
        """The registered blocks of the longest cached run of the sequence's full blocks, leaving at
        least its last token to compute (its logits are needed)."""
        if not self.prefix_caching:
            return []
        full = (len(seq) - 1) // BLOCK_SIZE
        hits: list[int] = []
        for key in self._hashes(seq, full):
            block = self._by_hash.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    @staticmethod
    def _hashes(seq: Sequence, count: int) -> list[bytes]:
        """The chained hashes of the sequence's first `count` full blocks (kept on the sequence: its
        tokens only ever grow, so they stay valid across preemption)."""
        tokens = None
        while len(seq.block_hashes) < count:
            tokens = tokens or seq.all_token_ids
            index = len(seq.block_hashes)
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            chunk = tokens[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
            seq.block_hashes.append(_block_key(previous, chunk, seq.adapter_key, seq.params.cache_scope))
        return seq.block_hashes[:count]

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
        child.num_registered = len(shared) if self.prefix_caching else 0
        if tokens % BLOCK_SIZE:
            if not self.num_free:
                raise RuntimeError("no free KV block for a fork's copy of its parent's last block")
            copy = self._take()
            cache.copy_block(parent.block_table[full], copy)
            child.block_table.append(copy)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None  # most recently freed last
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_registered = 0

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            key = self._hash_of[block]
            self._hash_of[block] = None
            if key is not None:
                del self._by_hash[key]
        self._holders[block] = 1
        return block

    @staticmethod
    def _has_room(seq: Sequence) -> bool:
        return len(seq) <= len(seq.block_table) * BLOCK_SIZE

    @staticmethod
    def slot(seq: Sequence, position: int) -> int:
        return seq.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


def _block_key(
    previous: bytes | None, tokens: list[int], adapter_key: str | None, scope: str | None
) -> bytes:
    """A full block's prefix-cache key: a cryptographic digest chained over the blocks before it, its token
    ids, the adapter and the tenant scope. Not Python's `hash`: tuple hashes of ints are predictable, so a
    tenant could craft token blocks that collide with another's and be served (or poison) their KV."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(previous or b"")
    for part in (adapter_key, scope):
        text = (part or "").encode()
        digest.update(len(text).to_bytes(4, "little") + text)  # length-prefixed: no two splits collide
    digest.update(array("q", tokens).tobytes())
    return digest.digest()
