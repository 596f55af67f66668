"""Shared by the artifact-check tests: a small training config and a dataset with short, answerable
held-out rows (an explicit evaluation split)."""

from __future__ import annotations

from typing import Any

from worker.training.config import TrainingConfig

TINY = "tiny-random-llama"


def make_config(**overrides: Any) -> TrainingConfig:
    """A few steps on the tiny model; no early stopping and no speculator phase unless a test asks."""
    small = {
        "speculator_train_steps": 0,
        "base_model": TINY,
        "train_steps": 4,
        "learning_rate": 1e-2,
        "micro_batch_size": 4,
        "effective_batch_size": 8,
        "max_seq_length": 96,
        "warmup_ratio": 0.0,
        "checkpoint_every_n_steps": 100,
        "enable_early_stopping": False,
        "load_best_at_end": False,
    }
    return TrainingConfig(**(small | overrides))


def number_rows(n: int = 24, held_out: int = 6) -> list[dict[str, str]]:
    """Prompt/completion rows; the last `held_out` are the evaluation split, in this order."""
    return [
        {
            "prompt": f"Say the number {i % 4}.",
            "completion": f"The number is {i % 4}.",
            "split": "evaluation" if i >= n - held_out else "train",
        }
        for i in range(n)
    ]
