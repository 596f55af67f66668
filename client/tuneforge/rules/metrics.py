"""The per-step metric fields a training job reports and the control plane stores, one row per step, and the
task metrics (rewards, accuracies, KL) stored beside them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# Reported after each optimizer step. `tokens` counts every position trained on (padding too);
# `useful_tokens` only the non-padding ones. Memory and utilisation come from the training process.
TRAIN_STEP_FIELDS = (
    "train_loss",
    "learning_rate",
    "epoch",
    "tokens",
    "grad_norm",
    "tokens_per_second",
    "useful_tokens",
    "peak_rss_bytes",
    "cuda_allocated_bytes",
    "gpu_utilization",
)
# Reported when a step is evaluated; merged into that step's row.
EVAL_STEP_FIELDS = ("eval_loss", "eval_perplexity")
# Set when the step stored a checkpoint.
CHECKPOINT_STEP_FIELDS = ("checkpoint_number",)
STEP_METRIC_FIELDS = TRAIN_STEP_FIELDS + EVAL_STEP_FIELDS + CHECKPOINT_STEP_FIELDS
# Counts, stored as integers however the trainer reported them.
INTEGER_FIELDS = frozenset(
    {"tokens", "useful_tokens", "peak_rss_bytes", "cuda_allocated_bytes", "checkpoint_number"}
)


# Task metrics: what a task reports beyond the fields above (dpo's reward accuracy, grpo's reward per function
# and KL, classification's accuracy and F1), kept as one JSON object per step. A name is a metric name with an
# optional `/<reward function name>`; bounded so a step's row stays small.
TASK_METRICS_FIELD = "task_metrics"
MAX_TASK_METRICS = 96
MAX_TASK_METRIC_NAME = 160
# Task metrics the Predibase SDK's progress table shows, by its frame key.
PREDIBASE_ACCURACY_KEYS = {
    "train_accuracy": "train_metrics_accuracy",
    "eval_accuracy": "validation_metrics_accuracy",
}
GRPO_REWARD_MEAN, GRPO_REWARD_STD, GRPO_REWARD_PREFIX = "reward_mean", "reward_std", "reward/"


def task_values(reported: Mapping[str, float | int | None]) -> dict[str, float]:
    """The task metrics of a step's report: every finite number not among the step fields, bounded."""
    values: dict[str, float] = {}
    for name, value in reported.items():
        if name in STEP_METRIC_FIELDS or name == "tokens_seen" or len(values) >= MAX_TASK_METRICS:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if len(name) <= MAX_TASK_METRIC_NAME:
            values[name] = float(value)
    return values


def grpo_rewards(task_metrics: Mapping[str, float] | None) -> dict[str, float | None] | None:
    """A GRPO step's rewards as the Predibase SDK's `grpo_train_rewards`: total_reward, total_reward_std and
    one key per reward function; None for a step without rewards."""
    if not task_metrics or GRPO_REWARD_MEAN not in task_metrics:
        return None
    rewards = {
        name[len(GRPO_REWARD_PREFIX) :]: value
        for name, value in task_metrics.items()
        if name.startswith(GRPO_REWARD_PREFIX)
    }
    return {
        "total_reward": task_metrics[GRPO_REWARD_MEAN],
        "total_reward_std": task_metrics.get(GRPO_REWARD_STD),
        **rewards,
    }


def step_values(
    reported: Mapping[str, float | int | None], fields: Iterable[str]
) -> dict[str, float | int | None]:
    """`fields` of a step's report (None where it has none), counts as integers."""
    values: dict[str, float | int | None] = {}
    for name in fields:
        value = reported.get(name)
        values[name] = int(value) if value is not None and name in INTEGER_FIELDS else value
    return values
