"""Owns what differs between training tasks: how rows become examples, what a step's loss is, how a model
is judged. The loop (worker/training/loop.py) runs any task the same way: steps, evaluation, early stopping,
checkpoints, exact resume and cancel.

`sft` and `continued_pretraining` are next-token learning (`LanguageModelingTask`, with the turbo heads'
losses); `dpo`, `grpo` and `classification` have their own modules, registered in `TASK_FACTORIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from worker.training import evaluation, feature_cache, objective
from worker.training.batches import make_batch
from worker.training.classification import ClassificationTask
from worker.training.config import TrainingConfig
from worker.training.data import PreparedData, prepare_data
from worker.training.grpo import grpo_task
from worker.training.preference import PreferenceTask
from worker.training.runtime import TrainingConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from worker.training.preparation import Inputs, Run


class StepBatch(Protocol):
    """One micro-batch of a step, as a task builds it."""

    @property
    def target_count(self) -> int:
        """What the step's summed loss is divided by (target tokens, pairs, rows, completions)."""
        ...

    @property
    def useful_tokens(self) -> int: ...  # real (non-padding) tokens through the model
    @property
    def token_count(self) -> int: ...  # every position through the model, padding included
    def to(self, device: torch.device) -> Any: ...


class TrainingTask(Protocol):
    """A training task; every method is called on the training thread."""

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> PreparedData:
        """Split and encode the rows; `PreparedData.train`/`eval` hold the task's own example type."""
        ...

    def step_batches(self, run: Run, micro_batches: Sequence[Sequence[Any]], step: int) -> list[StepBatch]:
        """Step `step`'s micro-batches (0-based), on the host; a task may sample from the model here
        (GRPO's rollouts, seeded by the step)."""
        ...

    def loss_sum(self, run: Run, batch: StepBatch) -> torch.Tensor:
        """The micro-batch's summed loss (0-dim fp32, with autograd) on the run's device; `batch` is the
        host batch (the task moves it, after reading what it needs on the host)."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the step just taken beyond loss and throughput (rewards, KL); cleared by the call."""
        ...

    def evaluate(self, run: Run) -> dict[str, float] | None:
        """Held-out metrics with `eval_loss` (lower is better: the loop tracks it for early stopping and
        the best weights); None without eval rows."""
        ...

    def baseline(self, run: Run) -> dict[str, Any] | None:
        """What the quality report compares against, measured before the first step (JSON: it is kept in
        checkpoints); at least `evaluate`'s metrics."""
        ...

    def restore(self, run: Run, baseline: dict[str, Any] | None) -> None:
        """A resumed run: the baseline it measured before its first step, back from the checkpoint (where
        a task keeps what it fixed at the start, e.g. DPO's reference log-probs)."""
        ...

    def quality_report(
        self, run: Run, baseline: dict[str, Any] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        """The version's quality report: the published weights (`after`, `evaluate`'s metrics) against
        the start (`baseline`)."""
        ...


class LanguageModelingTask:
    """sft and continued_pretraining: next-token loss on the labelled tokens, plus the speculator heads'
    losses for turbo types."""

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> PreparedData:
        return prepare_data(rows, tokenizer, config)

    def step_batches(self, run: Run, micro_batches: Sequence[Sequence[Any]], step: int) -> list[StepBatch]:
        return [make_batch(micro, run.pad_token_id, packed=run.config.packing) for micro in micro_batches]

    def loss_sum(self, run: Run, batch: StepBatch) -> torch.Tensor:
        # The feature cache reads the host batch's keys (no device sync), then the batch moves.
        features = None
        if run.features is not None:
            features = run.features.features(batch, run.device)  # type: ignore[arg-type]
        return objective.loss_sum(run.trainable, batch.to(run.device), features)

    def step_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, run: Run) -> dict[str, float] | None:
        loss = evaluation.sharded_eval_loss(run.trainable, run.data.eval, run.pad_token_id, run.world)
        if loss is None:
            return None
        return {"eval_loss": loss, "eval_perplexity": evaluation.perplexity(loss) or 0.0}

    def baseline(self, run: Run) -> dict[str, Any] | None:
        metrics: dict[str, Any] = dict(self.evaluate(run) or {})
        if run.world.is_main:  # generation, for the quality report that only rank 0 writes
            metrics["exact_match"] = evaluation.exact_match(run.trainable, run.data.eval, base=True)
        return metrics

    def restore(self, run: Run, baseline: dict[str, Any] | None) -> None:
        pass  # its baseline is only compared against, by the quality report

    def quality_report(
        self, run: Run, baseline: dict[str, Any] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        # Greedy exact match on the held-out rows: the base's (measured at the start) against the adapter's.
        adapter_match = evaluation.exact_match(run.trainable, run.data.eval, base=False)
        baseline = baseline or {}
        return evaluation.report(
            baseline.get("exact_match"),
            adapter_match,
            eval_loss_base=baseline.get("eval_loss"),
            eval_loss_adapter=(after or {}).get("eval_loss"),
        )


def build_features(run: Run) -> None:
    """The speculator's cached base-model features, when its method uses them (once per run)."""
    run.features_built = True
    visits = run.phase_steps * run.config.batch_size
    run.features = feature_cache.build(run.trainable, run.data.train, run.pad_token_id, visits=visits)
    if run.features is not None:
        run.trainable.details["speculator_feature_cache"] = run.features.details()


# task name -> the task's factory; the tasks beyond next-token learning register theirs here.
TASK_FACTORIES: dict[str, Callable[[TrainingConfig, Inputs], TrainingTask]] = {
    "sft": lambda config, inputs: LanguageModelingTask(),
    "continued_pretraining": lambda config, inputs: LanguageModelingTask(),
    "classification": lambda config, inputs: ClassificationTask(),
    "dpo": lambda config, inputs: PreferenceTask(config, inputs),
    "grpo": lambda config, inputs: grpo_task(config, inputs),
}


def task_for(config: TrainingConfig, inputs: Inputs) -> TrainingTask:
    """The task object a run of `config` trains with."""
    factory = TASK_FACTORIES.get(config.task)
    if factory is None:
        raise TrainingConfigError(f"task: '{config.task}' is not trained by this worker")
    return factory(config, inputs)
