"""Owns starting a multi-device run: one process per device, the calling process as rank 0.

Why the caller is rank 0, with ranks 1..N-1 as child processes, rather than torchrun or elastic_launch,
which make every rank a child: the callbacks (metrics and checkpoint rows written through the
caller's database session, checkpoint uploads through its storage client, the cancel poll) then stay
in ONE process, the caller's, exactly as in a one-device run. Nothing of the job has to be re-opened
in or relayed from a child, and the Celery task keeps its lease thread, time limit and error
handling. The children are plain `python -m worker.training.distributed` subprocesses, not
torch.multiprocessing ones: a Celery prefork child is a daemonic process to multiprocessing, which
may not start children. Each runs the same `train` with its `World` and no callbacks.

How the run divides work (worker/training/loop.py): every rank builds the same global batch and
forwards every N-th micro-batch of it; gradients (and loss sums) are then summed across ranks once
per optimiser step, so each rank applies the one-device run's update: DDP's gradient averaging with
its no_sync accumulation, done by hand after the backward passes (ranks may hold unequal numbers of
micro-batches, which the DDP wrapper cannot take without join()). Full fine-tuning is replicated the
same way (FSDP2 sharding is not used). Evaluation is sharded and summed; generation for the quality
report runs on rank 0 only. Rank 0 alone writes checkpoints, whose state is global (unsharded), so a
run resumes on any device count.

Failures: a rank that dies closes its connections, and gloo fails the others' next collective at
once; every collective is also bounded by a timeout (nccl reports a dead peer only then). When rank 0
fails, the children are terminated and the launch raises; a child whose parent is gone exits itself.
The job then resumes from its last checkpoint on its next delivery, as after any crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from worker.training import world as worlds
from worker.training.base_models import local_model_dir
from worker.training.config import TrainingConfig
from worker.training.loop import TrainingCallbacks, TrainingResult, train
from worker.training.runtime import TrainingConfigError
from worker.training.token_cache import DataCache

if TYPE_CHECKING:
    from worker.training.grpo_rollouts import RolloutSampler
    from worker.training.reward_sandbox import SandboxLimits

log = logging.getLogger(__name__)

# Bounds each collective; rank 0 alone generates for the quality report while the others wait.
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600.0
# Child ranks import torch and transformers before they can join.
STARTUP_TIMEOUT_SECONDS = 300.0
# How long a failed rank 0 waits to see which child died first, and how long a child gets to exit.
_DEATH_NOTICE_SECONDS, _GRACE_SECONDS = 2.0, 10.0


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-device run died or failed; the job resumes from its last checkpoint."""


@dataclass(frozen=True)
class _RankJob:
    """What a child rank needs to run its part (pickled to its stdin by its parent, rank 0)."""

    config: TrainingConfig
    rows: Sequence[Mapping[str, Any]]
    output_dir: Path
    cache_dir: Path
    model_dir: Path | None  # the base model, resolved before the ranks start
    trust_remote_code: bool
    resume_from: Path | None
    init_from: Path | None
    address: str  # host:port of rank 0's rendezvous
    size: int
    timeout_seconds: float
    threads: int  # torch intra-op threads per rank (the host's cores shared among the ranks)
    parent_pid: int


@dataclass
class _Child:
    rank: int
    process: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"rank {self.rank}"


def available_devices() -> int:
    """Devices this host can give one job: its CUDA devices, or 1 (CPU processes would share cores)."""
    return max(1, torch.cuda.device_count())


def train_on_devices(
    num_devices: int,
    config: TrainingConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    output_dir: Path,
    cache_dir: Path,
    model_dir: Path | None = None,
    trust_remote_code: bool = False,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    init_from: Path | None = None,
    data_cache: DataCache | None = None,
    dataset_fingerprint: str | None = None,
    collective_timeout_seconds: float = DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
    rollouts: RolloutSampler | None = None,
    reward_limits: SandboxLimits | None = None,
) -> TrainingResult:
    """`train` on `num_devices` devices of this host (this process is rank 0); rank 0's result.
    `rollouts` (task grpo's sampler) runs on one device only."""
    if num_devices > 1 and config.base_model is not None:
        # Resolved (a built-in built) once, before any process group exists: transformers'
        # save_pretrained writes no weights on a rank other than 0, so a child could not build it.
        model_dir = local_model_dir(config.base_model, model_dir, cache_dir)
    kwargs: dict[str, Any] = {"output_dir": output_dir, "cache_dir": cache_dir, "resume_from": resume_from}
    kwargs |= {"model_dir": model_dir, "trust_remote_code": trust_remote_code}
    kwargs |= {"init_from": init_from, "callbacks": callbacks}
    kwargs |= {"data_cache": data_cache, "dataset_fingerprint": dataset_fingerprint}
    if num_devices == 1:
        return train(config, rows, rollouts=rollouts, reward_limits=reward_limits, **kwargs)
    if rollouts is not None:
        raise TrainingConfigError(
            "num_devices: rollouts (task 'grpo') are sampled on one device; set it to 1"
        )
    previous_threads = torch.get_num_threads()
    job = _RankJob(
        config,
        list(rows),
        Path(output_dir),
        Path(cache_dir),
        model_dir,
        trust_remote_code,
        resume_from,
        init_from,
        f"127.0.0.1:{_free_port()}",
        num_devices,
        collective_timeout_seconds,
        max(1, previous_threads // num_devices),
        os.getpid(),
    )
    try:
        result = _run_as_rank_zero(job, rows, kwargs)
    finally:
        torch.set_num_threads(previous_threads)
    return result


def _run_as_rank_zero(
    job: _RankJob, rows: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]
) -> TrainingResult:
    """Start the child ranks, train as rank 0, and see every child out (killed, if the run failed)."""
    ready_read, ready_write = os.pipe()  # each child writes a byte here once it is about to join
    children: list[_Child] = []
    torch.set_num_threads(job.threads)
    try:
        try:
            # The children tokenise for themselves: the data cache is the caller's (a storage client).
            for rank in range(1, job.size):
                children.append(_start(job, rank, ready_write))
        finally:
            os.close(ready_write)  # the children hold their own copies
        _await_children(children, ready_read)
        world = worlds.join(0, job.size, job.address, job.timeout_seconds)
        result = train(job.config, rows, world=world, **kwargs)
    except BaseException as exc:
        failed = _failed_children(children, exc)
        _stop(children)
        if failed:
            raise DistributedTrainingError(
                f"multi-device training failed: {failed}; the job resumes from its last checkpoint"
            ) from exc
        raise
    finally:
        worlds.leave()
        os.close(ready_read)
    _finish(children)
    return result


def _start(job: _RankJob, rank: int, ready_write: int) -> _Child:
    """A child rank: this module run as a program, its job pickled to its stdin."""
    # The parent's import path, so the child finds this package however the parent found it.
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.training.distributed", str(rank), str(ready_write)],
        stdin=subprocess.PIPE,
        pass_fds=(ready_write,),
        env=env,
    )
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(pickle.dumps(job))
    return _Child(rank, process)


def _rank_main(rank: int, ready_write: int) -> None:
    """A child rank: tell rank 0 it is about to join, join, and run the same training, no callbacks."""
    job: _RankJob = pickle.loads(sys.stdin.buffer.read())  # written by our own parent (_start)
    threading.Thread(target=_exit_with_parent, args=(job.parent_pid,), daemon=True).start()
    torch.set_num_threads(job.threads)
    os.write(ready_write, b"r")
    os.close(ready_write)
    try:
        world = worlds.join(rank, job.size, job.address, job.timeout_seconds)
        train(
            job.config,
            job.rows,
            output_dir=job.output_dir,
            cache_dir=job.cache_dir,
            model_dir=job.model_dir,
            trust_remote_code=job.trust_remote_code,
            resume_from=job.resume_from,
            init_from=job.init_from,
            world=world,
        )
    finally:
        worlds.leave()


def _exit_with_parent(parent_pid: int) -> None:
    """A rank whose rank 0 is gone (killed with its Celery process) has nobody to report to: exit."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _await_children(children: list[_Child], ready_read: int) -> None:
    """Wait until each child is about to join (it has imported torch), failing at once if one dies."""
    waiting, deadline = len(children), time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while waiting:
        readable, _, _ = select.select([ready_read], [], [], 0.05)
        if readable:
            waiting -= len(os.read(ready_read, waiting))
            continue
        dead = [child for child in children if child.process.poll() is not None]
        if dead:
            raise DistributedTrainingError(
                f"{dead[0].name} {_how(dead[0].process.returncode)} while starting"
            )
        if time.monotonic() > deadline:
            raise DistributedTrainingError(f"ranks did not start within {STARTUP_TIMEOUT_SECONDS:.0f} s")


def _failed_children(children: list[_Child], exc: BaseException) -> str:
    """Which children died on their own, when rank 0 failed in a collective: the failure is then theirs.
    Any other error is rank 0's own (a config the children refused too, say), raised as it is."""
    # gloo reports a lost peer as a bare RuntimeError, nccl as a DistError; errors of our own (a config
    # or data error, a missing base model) are subclasses with a message for the user.
    if not (isinstance(exc, dist.DistError) or type(exc) is RuntimeError):
        return ""
    # A peer's death reaches rank 0 as a failed collective, maybe a moment before its exit status.
    deadline = time.monotonic() + _DEATH_NOTICE_SECONDS
    while time.monotonic() < deadline and all(child.process.poll() is None for child in children):
        time.sleep(0.02)
    return ", ".join(
        f"{child.name} {_how(child.process.poll())}"
        for child in children
        if child.process.poll() not in (None, 0)
    )


def _how(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _stop(children: list[_Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    for child in children:
        try:
            child.process.wait(_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def _finish(children: list[_Child]) -> None:
    """The children end once the last collective is done; rank 0 has its result by then."""
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(_GRACE_SECONDS)
        if child.process.poll() != 0:
            log.warning("%s %s after the run completed", child.name, _how(child.process.poll()))
    _stop(children)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]))
