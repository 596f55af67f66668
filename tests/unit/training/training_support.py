"""Shared by the training-core tests: a small config, a learnable dataset, and a recording callback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.training.config import TrainingConfig
from worker.training.data import DataStats
from worker.training.loop import NoCallbacks, TrainingResult, train

TINY = "tiny-random-llama"


def make_config(**overrides: Any) -> TrainingConfig:
    """fp32 so that exactness tests compare like with like; no early stopping and no speculator phase
    (test_speculator_phase.py has it) unless a test asks."""
    small = {
        "speculator_train_steps": 0,
        "base_model": TINY,
        "train_steps": 6,
        "learning_rate": 1e-2,
        "micro_batch_size": 4,
        "effective_batch_size": 8,
        "max_seq_length": 64,
        "warmup_ratio": 0.0,
        "checkpoint_every_n_steps": 100,
        "dtype": "fp32",
        "enable_early_stopping": False,
        "load_best_at_end": False,
    }
    return TrainingConfig(**(small | overrides))


def number_rows(n: int = 24) -> list[dict[str, str]]:
    return [{"prompt": f"Say the number {i % 4}.", "completion": f"The number is {i % 4}."} for i in range(n)]


class Recorder(NoCallbacks):
    """Keeps every callback, and can stop the run (or crash it) at a given step."""

    def __init__(self, stop_after: int | None = None, crash_at_checkpoint: int | None = None) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.evals: list[tuple[int, float]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.data: list[DataStats] = []
        self.stop_after, self.crash_at_checkpoint = stop_after, crash_at_checkpoint

    def on_data(self, stats: DataStats) -> None:
        self.data.append(stats)

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, metrics))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evals.append((step, metrics["eval_loss"]))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append((step, path))
        if step == self.crash_at_checkpoint:
            raise RuntimeError("simulated worker crash")

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def losses(self) -> list[float]:
        return [metrics["train_loss"] for _, metrics in self.steps]


@dataclass
class CrashedRun:
    straight: Recorder  # the run without a crash, in <tmp>/a
    crashed: Recorder  # the same run in <tmp>/b, crashed at a checkpoint
    resumed: Recorder  # <tmp>/b resumed from that checkpoint
    result: TrainingResult  # of the resumed run


def crash_and_resume(
    config: TrainingConfig, rows: list[dict[str, str]], tmp_path: Path, cache_dir: Path, *, at: int
) -> CrashedRun:
    """Runs `config` straight, then again crashing at checkpoint step `at`, then resumes from it as the
    worker does after a crash."""
    straight, crashed, resumed = Recorder(), Recorder(crash_at_checkpoint=at), Recorder()
    train(config, rows, output_dir=tmp_path / "a", cache_dir=cache_dir, callbacks=straight)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        train(config, rows, output_dir=tmp_path / "b", cache_dir=cache_dir, callbacks=crashed)
    result = train(config, rows, output_dir=tmp_path / "b", cache_dir=cache_dir, callbacks=resumed,
                   resume_from=tmp_path / "b" / "checkpoints" / f"step-{at}")  # fmt: skip
    return CrashedRun(straight, crashed, resumed, result)
