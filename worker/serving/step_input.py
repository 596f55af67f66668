"""One engine step's input tensors (`StepInput`): token ids, positions, cache slots, per-token adapters,
and for decode steps each sequence's context in the paged cache (with drafts to verify, padded queries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.serving.kv_cache import BLOCK_SIZE, BlockManager
from worker.serving.lora import AdapterWeights
from worker.serving.sequence import Sequence


@dataclass
class StepInput:
    """One step's tensors. Prefill steps hold each sequence's uncached tokens; decode steps one token per
    sequence (or its drafts), attending to the paged cache's gathered context."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor | None  # [T] where each token's K/V goes in the cache; None: nowhere
    token_adapter: torch.Tensor  # [T] index into `adapters`, -1 = base model
    adapters: list[AdapterWeights]
    logits_indices: torch.Tensor  # [B] the token whose next-token logits each sequence needs
    prefill_lengths: list[int] | None = None  # prefill: tokens fed of each sequence, in order
    # Prefill with a cached prefix (prefix caching, chunks): where each sequence's feed starts, and the
    # cache slots of its context up to its feed's end.
    prefill_starts: list[int] | None = None
    prefill_context: list[torch.Tensor] | None = None
    context_slots: torch.Tensor | None = None  # decode: [B, L] cache slots of each sequence's context
    context_mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] True where a slot is real
    context_flat: torch.Tensor | None = None  # decode: context_slots flattened, [B * L]
    # Decode with drafts (speculation): some sequences feed several tokens. Their queries are padded
    # to [B, Q]: query_index picks each (b, i) from the flat tokens, query_valid maps back.
    query_index: torch.Tensor | None = None  # [B, Q] into the T flat tokens (padding → 0)
    query_valid: torch.Tensor | None = None  # [T] positions of the real queries in the [B * Q] grid


def prefill_input(
    seqs: list[Sequence],
    adapters: list[AdapterWeights],
    owner: list[int],
    device: torch.device,
    ends: list[int] | None = None,
) -> StepInput:
    """Each sequence's tokens from `num_cached` up to its `ends` entry (default: all of them).

    With nothing cached this is a plain causal prefill over each sequence's own tokens. Where some
    sequence has a cached prefix (prefix caching, or an earlier chunk), each sequence's queries attend to
    its context gathered from the cache (its fed tokens included, written first), causally.
    `prefill_lengths` holds the tokens fed per sequence either way.
    """
    ends = ends or [len(seq) for seq in seqs]
    starts = [seq.num_cached for seq in seqs]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    token_adapter: list[int] = []
    last: list[int] = []
    lengths: list[int] = []
    for seq, pos, start, end in zip(seqs, owner, starts, ends, strict=True):
        tokens = seq.all_token_ids[start:end]
        ids.extend(tokens)
        positions.extend(range(start, end))
        slots.extend(BlockManager.slot(seq, p) for p in range(start, end))
        token_adapter.extend([pos] * len(tokens))
        last.append(len(ids) - 1)
        lengths.append(len(tokens))
    step = StepInput(
        input_ids=_on_device(ids, device),
        positions=_on_device(positions, device),
        slot_mapping=_on_device(slots, device),
        token_adapter=_on_device(token_adapter, device),
        adapters=adapters,
        logits_indices=_on_device(last, device),
        prefill_lengths=lengths,
    )
    if any(starts):
        context = _context_slots(seqs, max(ends))
        step.prefill_starts = starts
        step.prefill_context = [_on_device(context[row, :end], device) for row, end in enumerate(ends)]
    return step


def decode_input(
    seqs: list[Sequence],
    adapters: list[AdapterWeights],
    owner: list[int],
    device: torch.device,
    drafts: list[list[int]] | None = None,
) -> StepInput:
    """One token per sequence, or with `drafts` its last token plus the drafts to verify.

    Logits come back for every fed token (in order); the caller slices them per sequence.
    """
    drafts = drafts or [[] for _ in seqs]
    fed = [1 + len(d) for d in drafts]
    totals = [len(seq) + len(d) for seq, d in zip(seqs, drafts, strict=True)]  # context incl. drafts
    longest = max(totals)
    lengths = torch.tensor(totals)
    context = _context_slots(seqs, longest)
    ids = [t for seq, d in zip(seqs, drafts, strict=True) for t in [seq.all_token_ids[-1], *d]]
    positions = torch.tensor([len(seq) - 1 + i for seq, n in zip(seqs, fed, strict=True) for i in range(n)])
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(fed))
    step = StepInput(
        input_ids=_on_device(ids, device),
        positions=_on_device(positions, device),
        slot_mapping=_on_device(context[rows, positions], device),
        token_adapter=_on_device([o for o, n in zip(owner, fed, strict=True) for _ in range(n)], device),
        adapters=adapters,
        logits_indices=_on_device(torch.arange(len(ids)), device),
        context_slots=_on_device(context, device),
        context_flat=_on_device(context.reshape(-1), device),
    )
    keys = torch.arange(longest)[None, None, :]
    if max(fed) == 1:
        step.context_mask = _on_device((keys < lengths[:, None, None])[:, None], device)  # [B, 1, 1, L]
    else:
        _add_verify_queries(step, fed, lengths, keys, device)
    return step


def _context_slots(seqs: list[Sequence], longest: int) -> torch.Tensor:
    """`[B, longest]` cache slots of each sequence's context; padding past its length is masked later."""
    tables = torch.zeros(len(seqs), max(len(seq.block_table) for seq in seqs), dtype=torch.long)
    for row, seq in enumerate(seqs):
        tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table)
    # [B, blocks] → [B, blocks*16] slots, cut to the longest context.
    return (tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(len(seqs), -1)[:, :longest]


def _add_verify_queries(
    step: StepInput, fed: list[int], lengths: torch.Tensor, keys: torch.Tensor, device: torch.device
) -> None:
    """Padded queries `[B, Q]` for a step where some sequences feed drafts, each causal up to itself."""
    width = max(fed)
    query = torch.arange(width)[None, :]  # [1, Q]
    valid = query < torch.tensor(fed)[:, None]  # [B, Q]
    starts = torch.tensor([0, *torch.tensor(fed).cumsum(0)[:-1].tolist()])
    step.query_index = _on_device(torch.where(valid, starts[:, None] + query, 0), device)
    step.query_valid = _on_device(valid.reshape(-1).nonzero().squeeze(1), device)
    # Query i of sequence b sits at absolute position (total_b - fed_b + i): causal up to it.
    last_visible = (lengths - torch.tensor(fed))[:, None] + query  # [B, Q]
    mask = keys <= last_visible[:, :, None]  # [B, Q, L]
    mask[:, :, 0] = True  # padded queries see one key (no all-masked rows, no NaN); discarded anyway
    step.context_mask = _on_device(mask[:, None], device)  # [B, 1, Q, L]


def _on_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    return tensor.to(device, non_blocking=True)
