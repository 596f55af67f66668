"""Multi-device training on CPU: two gloo processes (this one is rank 0) must follow the one-process run's
trajectory, stop together on a cancel, fail promptly when a rank is killed, and resume on any count.

Tolerance: per-step losses within 1e-5 relative (fp32). Both runs forward the very same micro-batches
with the same dropout masks; only the order of float summation differs (per rank, then across ranks).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from tests_support import children_running
from training_support import Recorder, make_config, number_rows

from worker.training.config import TrainingConfig
from worker.training.distributed import DistributedTrainingError, train_on_devices
from worker.training.loop import train
from worker.training.runtime import TrainingConfigError

REL = 1e-5
STEPS = 4


def config() -> TrainingConfig:
    # Two micro-batches per step (one per rank); LoRA dropout stays on (the default 0.05).
    return make_config(
        train_steps=STEPS,
        micro_batch_size=4,
        effective_batch_size=8,
        checkpoint_every_n_steps=2,
        num_devices=2,
    )


def ranks() -> list[psutil.Process]:
    """This process's child ranks (the other rank of a two-device run)."""
    return children_running("worker.training.distributed")


class KillRankOne(Recorder):
    """SIGKILLs the other rank once step `at` is reported, as an OOM killer would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.killed_at = at, 0.0

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        super().on_step(step, total_steps, metrics)
        if step == self.at:
            for child in ranks():
                os.kill(child.pid, signal.SIGKILL)
            self.killed_at = time.monotonic()


@pytest.fixture(autouse=True)
def one_thread() -> object:
    # Each rank computes on one thread: two ranks on this small machine must not oversubscribe it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    """The one-process reference run."""
    recorder = Recorder()
    out = tmp_path_factory.mktemp("single")
    train(config(), number_rows(), output_dir=out, cache_dir=tiny_cache, callbacks=recorder)
    return recorder


def test_two_ranks_follow_one_and_resume_after_a_rank_is_killed(
    single: Recorder, tiny_cache: Path, tmp_path: Path
) -> None:
    killed = KillRankOne(at=3)
    with pytest.raises(DistributedTrainingError, match="rank 1 was killed by SIGKILL"):
        train_on_devices(
            2, config(), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=killed
        )
    # Failed at rank 0's next collective, not after the collective timeout (600 s).
    assert 0 < time.monotonic() - killed.killed_at < 30
    assert not ranks()
    # Steps 1-3 ran on two ranks before the kill: the one-process losses, step by step.
    assert killed.losses() == pytest.approx(single.losses()[:3], rel=REL)
    assert [step for step, _ in killed.checkpoints] == [2]

    resumed = Recorder()
    result = train_on_devices(
        2,
        config(),
        number_rows(),
        output_dir=tmp_path,
        cache_dir=tiny_cache,
        callbacks=resumed,
        resume_from=tmp_path / "checkpoints" / "step-2",
    )
    assert [step for step, _ in resumed.steps] == [3, 4]
    assert resumed.losses() == pytest.approx(single.losses()[2:], rel=REL)
    assert [loss for _, loss in resumed.evals] == pytest.approx(
        [loss for _, loss in single.evals[1:]], rel=REL
    )
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()

    # The two-rank checkpoint holds global state: one process continues it on the same trajectory.
    alone = Recorder()
    train(
        config().model_copy(update={"num_devices": 1}),
        number_rows(),
        output_dir=tmp_path / "alone",
        cache_dir=tiny_cache,
        callbacks=alone,
        resume_from=tmp_path / "checkpoints" / "step-2",
    )
    assert alone.losses() == pytest.approx(single.losses()[2:], rel=REL)


def test_a_cancel_seen_by_rank_zero_stops_both_ranks(tiny_cache: Path, tmp_path: Path) -> None:
    canceled = Recorder(stop_after=1)
    result = train_on_devices(
        2, config(), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=canceled
    )
    assert result.stopped and result.steps == 1 and result.adapter_dir is None
    assert [step for step, _ in canceled.checkpoints] == [1]  # checkpointed where it stopped
    assert not ranks()  # rank 1 stopped too, and exited


def test_full_fine_tuning_on_two_ranks_follows_one(tiny_cache: Path, tmp_path: Path) -> None:
    # Every weight trains: the gradients summed across ranks are the whole model's.
    full = make_config(
        adapter="full", learning_rate=1e-4, train_steps=2, micro_batch_size=2, effective_batch_size=4
    )
    alone, two = Recorder(), Recorder()
    train(full, number_rows(), output_dir=tmp_path / "one", cache_dir=tiny_cache, callbacks=alone)
    train_on_devices(
        2,
        full.model_copy(update={"num_devices": 2}),
        number_rows(),
        output_dir=tmp_path / "two",
        cache_dir=tiny_cache,
        callbacks=two,
    )
    assert two.losses() == pytest.approx(alone.losses(), rel=REL)
    assert [loss for _, loss in two.evals] == pytest.approx([loss for _, loss in alone.evals], rel=REL)


def test_an_error_of_rank_zero_reaches_the_caller_as_it_is(tiny_cache: Path, tmp_path: Path) -> None:
    # Every rank refuses this config; the caller sees the error that names the field, not a rank's death.
    too_long = config().model_copy(update={"max_seq_length": 100_000})
    with pytest.raises(TrainingConfigError, match="max_seq_length"):
        train_on_devices(2, too_long, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    assert not ranks()
