"""The per-step metric fields a training job reports and the control plane stores, one row per step."""

from __future__ import annotations

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


def step_values(
    reported: Mapping[str, float | int | None], fields: Iterable[str]
) -> dict[str, float | int | None]:
    """`fields` of a step's report (None where it has none), counts as integers."""
    values: dict[str, float | int | None] = {}
    for name in fields:
        value = reported.get(name)
        values[name] = int(value) if value is not None and name in INTEGER_FIELDS else value
    return values
