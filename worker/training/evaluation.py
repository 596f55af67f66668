"""Owns judging a run: held-out loss and perplexity, best-so-far tracking, early stopping, quality."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.training import objective, quality
from worker.training.batches import make_batch
from worker.training.data import Example
from worker.training.methods import TrainableModel
from worker.training.quality import perplexity
from worker.training.world import World

__all__ = [
    "EvalTracker",
    "eval_loss",
    "exact_match",
    "loss_sums",
    "perplexity",
    "report",
    "sharded_eval_loss",
]


@dataclass
class EvalTracker:
    """Best eval loss so far and patience left; saved in checkpoints so a resumed run keeps counting."""

    best_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    best_metrics: dict[str, float] | None = None  # the task's metrics at the best evaluation

    def observe(self, step: int, loss: float, metrics: dict[str, float] | None = None) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            self.best_metrics = metrics
            return True
        self.evals_without_improvement += 1
        return False

    def out_of_patience(self, patience: int) -> bool:
        return self.evals_without_improvement >= patience


def eval_loss(trainable: TrainableModel, examples: Sequence[Example], pad_token_id: int) -> float | None:
    """Mean loss per target token (the run's objective: next-token loss, plus the weighted head
    losses for turbo types); None without any.
    """
    total, count = loss_sums(trainable, examples, pad_token_id)
    return total / count if count else None


def sharded_eval_loss(
    trainable: TrainableModel, examples: Sequence[Example], pad_token_id: int, world: World
) -> float | None:
    """eval_loss with each rank of `world` evaluating its share of the eval micro-batches."""
    share = loss_sums(trainable, examples, pad_token_id, part=world.rank, parts=world.size)
    total, count = world.sum(share)
    return total / count if count else None


@torch.no_grad()
def loss_sums(
    trainable: TrainableModel,
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    part: int = 0,
    parts: int = 1,
) -> tuple[float, int]:
    """(summed loss, target count) over the eval micro-batches numbered part, part + parts, ...: one
    rank's share of a sharded evaluation (the caller sums the shares)."""
    model, config = trainable.model, trainable.config
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    size = config.eval_micro_batch_size
    try:
        for start in range(part * size, len(examples), parts * size):
            batch = make_batch(examples[start : start + size], pad_token_id, packed=config.packing)
            with trainable.autocast():
                total += float(objective.loss_sum(trainable, batch.to(trainable.runtime.device)))
            count += batch.target_count
    finally:
        model.train(was_training)
    return total, count


def exact_match(
    trainable: TrainableModel, examples: Sequence[Example], *, base: bool
) -> dict[str, Any] | None:
    """Greedy exact match on the held-out rows with a short completion; `base`: without the adapter.

    None when no row qualifies, or when the base model's behaviour cannot be had from this model.
    """
    answerable = quality.answerable(list(examples))
    if not answerable:
        return None
    config = trainable.config

    def score() -> dict[str, Any]:
        with trainable.autocast():
            result = quality.exact_match(
                trainable.model,
                trainable.tokenizer,
                answerable,
                batch_size=max(config.eval_micro_batch_size, 8),
                max_samples=config.max_eval_samples,
            )
        return result.to_json()

    if not base:
        return score()
    with trainable.as_base_model() as available:
        return score() if available else None


def report(
    base: dict[str, Any] | None,
    adapter: dict[str, Any] | None,
    *,
    eval_loss_base: float | None,
    eval_loss_adapter: float | None,
) -> dict[str, Any]:
    return quality.quality_report(
        quality.ExactMatch.from_json(base) if base else None,
        quality.ExactMatch.from_json(adapter) if adapter else None,
        eval_loss_base=eval_loss_base,
        eval_loss_adapter=eval_loss_adapter,
    )
