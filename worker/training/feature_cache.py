"""Owns a turbo run's frozen-model features: computed once per training example, gathered for every step.

adapter="turbo" trains only the speculator; the model (the base, or base + a frozen parent LoRA) never
changes, yet its forward is most of a step. So its final-norm hidden states (and, for self-distillation,
its greedy tokens) are computed once per distinct training example, and each step gathers its batch's
features from them instead of running the decoder.

Determinism: the features come from one fixed grouping (the distinct examples in dataset order, chunked
by eval_micro_batch_size, laid out packed or padded as training lays them out), whatever order training
visits them in, so a resumed run reads exactly what a straight run reads. A batch holding any example
the cache lacks (the eval split) runs the model as before: never a mix of cached and live features.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.training.batches import Batch, make_batch, shifted_targets
from worker.training.data import IGNORE_INDEX, Example
from worker.training.methods import TrainableModel

log = logging.getLogger(__name__)

# Above this the run behaves as before (the model runs every step): the cache must never be what makes a
# run run out of memory. 2 GiB holds ~1.8M tokens of a 576-wide model in bf16.
BUDGET_BYTES = 2 * 2**30
# On a GPU the cache stays there only if it takes at most this share of free memory; else it lives on
# the host and each step copies its batch's slice over (a few MB, small beside the step).
GPU_FREE_FRACTION = 0.25
_LM_HEAD_ROWS = 1024  # positions per LM-head pass when taking greedy tokens: bounds the [rows, V] logits


@dataclass(frozen=True)
class Features:
    """What the frozen model gives a batch: hidden [B, S, H] (model dtype) and greedy tokens [B, S]."""

    hidden: torch.Tensor
    greedy: torch.Tensor | None  # None unless the run distills; IGNORE_INDEX where no target


class FeatureCache:
    """Every distinct training example's features, back to back; keyed by the bytes of its input_ids
    (hidden states depend on the tokens alone, so duplicates share one entry)."""

    def __init__(
        self, hidden: torch.Tensor, greedy: torch.Tensor | None, starts: dict[bytes, int], seconds: float
    ) -> None:
        # [T + 1, H]; row T is zeros, what padding gathers. In the model's own dtype, not fp32: it is what
        # the step's decoder would hand the speculator (so the losses are the same), at half the bytes.
        self.hidden = hidden
        self.greedy = greedy  # [T + 1] long, row T IGNORE_INDEX; None without distillation
        self.starts = starts  # example key -> its first row
        self.seconds = seconds

    @property
    def nbytes(self) -> int:
        greedy = 0 if self.greedy is None else self.greedy.nbytes
        return self.hidden.nbytes + greedy

    def details(self) -> dict[str, Any]:
        """What the training summary records (method details)."""
        return {
            "examples": len(self.starts),
            "tokens": self.hidden.shape[0] - 1,
            "bytes": self.nbytes,
            "seconds": round(self.seconds, 3),
            "device": self.hidden.device.type,
        }

    def features(self, batch: Batch, device: torch.device) -> Features | None:
        """The batch's features on `device`, or None when some example of it is not cached.

        `batch` is the host batch: its keys are read without a device sync.
        """
        index = self._index(batch)
        if index is None:
            return None
        rows = index.to(self.hidden.device)
        hidden = self.hidden.index_select(0, rows.flatten()).view(*index.shape, -1)
        greedy = None
        if self.greedy is not None:
            greedy = self.greedy.index_select(0, rows.flatten()).view(index.shape)
            # Only positions with a target carry one, as when the LM head runs in the step.
            greedy = greedy.masked_fill(batch.targets.to(greedy.device) == IGNORE_INDEX, IGNORE_INDEX)
            greedy = greedy.to(device, non_blocking=True)
        return Features(hidden.to(device, non_blocking=True), greedy)

    def _index(self, batch: Batch) -> torch.Tensor | None:
        """[B, S] rows of the cache for every position of the batch (padding -> the zero row)."""
        ids = batch.input_ids.cpu()
        pad_row = self.hidden.shape[0] - 1
        index = torch.full(ids.shape, pad_row, dtype=torch.long)
        if batch.cu_seq_lens is not None:
            bounds = batch.cu_seq_lens.tolist()
            spans = [(0, a, b) for a, b in itertools.pairwise(bounds)]
        else:
            assert batch.attention_mask is not None
            lengths = batch.attention_mask.sum(1).tolist()
            spans = [(row, 0, int(n)) for row, n in enumerate(lengths)]
        for row, a, b in spans:
            start = self.starts.get(_key(ids[row, a:b]))
            if start is None:
                return None
            index[row, a:b] = torch.arange(start, start + b - a)
        return index


def _key(ids: torch.Tensor) -> bytes:
    return ids.to(torch.long).contiguous().numpy().tobytes()


def estimate_bytes(
    distinct: Sequence[Example], hidden_size: int, dtype: torch.dtype, *, distill: bool
) -> int:
    """The cache's size: one row per token of each (distinct) example, plus the pad row."""
    rows = sum(len(e.input_ids) for e in distinct) + 1
    return rows * hidden_size * dtype.itemsize + (rows * 8 if distill else 0)


def placement(size: int, device: torch.device, budget: int) -> torch.device | None:
    """Where a cache of `size` bytes lives: the run's GPU if it fits there easily, else the host;
    None above the budget (the run then computes features every step, as without a cache)."""
    if size > budget:
        return None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if size <= GPU_FREE_FRACTION * free else torch.device("cpu")
    return torch.device("cpu")


@torch.no_grad()
def build(
    trainable: TrainableModel,
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    visits: int,
    budget: int | None = None,
) -> FeatureCache | None:
    """The features of every training example, or None when the run trains the model, when they don't fit
    in `budget` bytes (default BUDGET_BYTES, read at call time so a test can lower it), or when the run
    reads fewer examples (`visits`: steps x batch size) than there are distinct ones: under one epoch the
    cache would cost more forwards than it saves."""
    if trainable.speculator is None or trainable.trains_model or not examples:
        return None
    started = time.perf_counter()
    firsts: dict[bytes, Example] = {}
    has_target: dict[bytes, torch.Tensor] = {}  # [n] where any copy of the example takes a loss
    for example in examples:  # dataset order, not training order: a resumed run groups them the same
        key = _key(torch.tensor(example.input_ids))
        firsts.setdefault(key, example)
        targets = torch.tensor(shifted_targets(example)) != IGNORE_INDEX
        has_target[key] = has_target[key] | targets if key in has_target else targets
    distinct = list(firsts.values())
    if visits <= len(distinct):
        return None
    runtime = trainable.runtime
    distill = trainable.speculator.config.distill
    causal_lm = trainable.causal_lm()
    hidden_size = int(causal_lm.config.hidden_size)
    size = estimate_bytes(distinct, hidden_size, runtime.dtype, distill=distill)
    where = placement(size, runtime.device, BUDGET_BYTES if budget is None else budget)
    if where is None:
        log.info("turbo: features of %d training examples (%.0f MB) exceed the cache budget; "
                 "the model runs every step", len(distinct), size / 2**20)  # fmt: skip
        return None
    was_training = trainable.model.training
    trainable.model.eval()  # turbo trains in eval mode too: no dropout in the frozen model
    try:
        hidden, starts = _hidden_states(trainable, distinct, pad_token_id, where)
        wanted = torch.cat([*has_target.values(), torch.zeros(1, dtype=torch.bool)])  # [T + 1], in row order
        greedy = _greedy(trainable, hidden, wanted) if distill else None
    finally:
        trainable.model.train(was_training)
    cache = FeatureCache(hidden, greedy, starts, time.perf_counter() - started)
    log.info("turbo: features of %d training examples cached (%.1f MB, %s) in %.1f s",
             len(distinct), cache.nbytes / 2**20, where.type, cache.seconds)  # fmt: skip
    return cache


def _hidden_states(
    trainable: TrainableModel, distinct: list[Example], pad_token_id: int, where: torch.device
) -> tuple[torch.Tensor, dict[bytes, int]]:
    """[T + 1, H] final-norm hidden states of every example back to back (last row zeros), and each
    example's first row; computed eval_micro_batch_size examples at a time, as training lays them out."""
    config, device = trainable.config, trainable.runtime.device
    decoder = trainable.causal_lm().get_decoder()
    total = sum(len(e.input_ids) for e in distinct)
    store: torch.Tensor | None = None
    starts: dict[bytes, int] = {}
    row, size = 0, config.eval_micro_batch_size
    for first in range(0, len(distinct), size):
        micro = distinct[first : first + size]
        batch = make_batch(micro, pad_token_id, packed=config.packing)
        with trainable.autocast():
            out = decoder(**batch.to(device).model_inputs()).last_hidden_state  # [B, S, H]
        if store is None:
            store = torch.zeros((total + 1, out.shape[-1]), dtype=out.dtype, device=where)
        for i, example in enumerate(micro):
            n = len(example.input_ids)
            if batch.cu_seq_lens is not None:
                offset = int(batch.cu_seq_lens[i])
                piece = out[0, offset : offset + n]
            else:
                piece = out[i, :n]
            store[row : row + n] = piece.to(where)
            starts[_key(torch.tensor(example.input_ids))] = row
            row += n
    assert store is not None
    return store, starts


def _greedy(trainable: TrainableModel, hidden: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """[T + 1] the LM head's argmax at the `wanted` rows (positions with a target), IGNORE_INDEX elsewhere:
    prompt positions never need one, and skipping them skips most of the vocabulary projection."""
    lm_head = trainable.causal_lm().get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Module)
    device = trainable.runtime.device
    greedy = torch.full((hidden.shape[0],), IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    rows = wanted.nonzero().squeeze(1).to(hidden.device)  # [N]
    for chunk in rows.split(_LM_HEAD_ROWS):
        logits = lm_head(hidden[chunk].to(device)).float()  # [rows, V]
        greedy[chunk] = logits.argmax(-1).to(hidden.device)
    return greedy
