"""Owns starting a multi-device run: one process per device, the calling process as rank 0.

Why the caller is rank 0 (torch.multiprocessing "spawn" children for ranks 1..N-1) rather than torchrun
or elastic_launch, which make every rank a child: the callbacks (metrics and checkpoint rows written
through the caller's database session, checkpoint uploads through its storage client, the cancel
poll) then stay in ONE process, the caller's, exactly as in a one-device run. Nothing of the job has
to be re-opened in or relayed from a child, and the Celery task keeps its lease thread, time limit and
error handling. The children run the same `train` with their `World` and no callbacks.

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

import logging
import multiprocessing.connection
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worker.training import world as worlds
from worker.training.config import TrainingConfig
from worker.training.loop import TrainingCallbacks, TrainingResult, train
from worker.training.token_cache import DataCache

log = logging.getLogger(__name__)

# Bounds each collective; rank 0 alone generates for the quality report while the others wait.
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600.0
# Spawned ranks import torch and transformers before they can join.
STARTUP_TIMEOUT_SECONDS = 300.0
# How long a failed rank 0 waits to see which child died first, and how long a child gets to exit.
_DEATH_NOTICE_SECONDS, _GRACE_SECONDS = 2.0, 10.0


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-device run died or failed; the job resumes from its last checkpoint."""


@dataclass(frozen=True)
class _RankJob:
    """What a spawned rank needs to run its part (pickled to it)."""

    config: TrainingConfig
    rows: Sequence[Mapping[str, Any]]
    output_dir: Path
    cache_dir: Path
    resume_from: Path | None
    init_from: Path | None
    address: str  # host:port of rank 0's rendezvous
    size: int
    timeout_seconds: float
    threads: int  # torch intra-op threads per rank (the host's cores shared among the ranks)
    parent_pid: int


def train_on_devices(
    num_devices: int,
    config: TrainingConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    output_dir: Path,
    cache_dir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    init_from: Path | None = None,
    data_cache: DataCache | None = None,
    dataset_fingerprint: str | None = None,
    collective_timeout_seconds: float = DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
) -> TrainingResult:
    """`train` on `num_devices` devices of this host (this process is rank 0); rank 0's result."""
    kwargs: dict[str, Any] = {"output_dir": output_dir, "cache_dir": cache_dir, "resume_from": resume_from}
    kwargs |= {"init_from": init_from, "callbacks": callbacks}
    if num_devices == 1:
        return train(config, rows, data_cache=data_cache, dataset_fingerprint=dataset_fingerprint, **kwargs)
    previous_threads = torch.get_num_threads()
    threads = max(1, previous_threads // num_devices)
    job = _RankJob(
        config,
        list(rows),
        Path(output_dir),
        Path(cache_dir),
        resume_from,
        init_from,
        f"127.0.0.1:{_free_port()}",
        num_devices,
        collective_timeout_seconds,
        threads,
        os.getpid(),
    )
    context = mp.get_context("spawn")
    ready: Any = context.SimpleQueue()
    children = [
        context.Process(target=_rank_main, args=(job, rank, ready), name=f"tuneforge-rank-{rank}")
        for rank in range(1, num_devices)
    ]
    for child in children:
        child.start()
    torch.set_num_threads(threads)
    try:
        _await_children(children, ready)
        world = worlds.join(0, num_devices, job.address, collective_timeout_seconds)
        # The children tokenise for themselves: the data cache is the caller's (a storage client).
        result = train(
            config,
            rows,
            world=world,
            data_cache=data_cache,
            dataset_fingerprint=dataset_fingerprint,
            **kwargs,
        )
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
        torch.set_num_threads(previous_threads)
    _finish(children)
    return result


def available_devices() -> int:
    """Devices this host can give one job: its CUDA devices, or 1 (CPU processes would share cores)."""
    return max(1, torch.cuda.device_count())


def _rank_main(job: _RankJob, rank: int, ready: Any) -> None:
    """A spawned rank: join, and run the same training with no callbacks."""
    threading.Thread(target=_exit_with_parent, args=(job.parent_pid,), daemon=True).start()
    torch.set_num_threads(job.threads)
    ready.put(rank)
    try:
        world = worlds.join(rank, job.size, job.address, job.timeout_seconds)
        train(
            job.config,
            job.rows,
            output_dir=job.output_dir,
            cache_dir=job.cache_dir,
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


def _await_children(children: list[Any], ready: Any) -> None:
    """Wait until each child is about to join (it has imported torch), failing at once if one dies."""
    waiting, deadline = len(children), time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while waiting:
        if not ready.empty():
            ready.get()
            waiting -= 1
            continue
        dead = [child for child in children if child.exitcode is not None]
        if dead:
            raise DistributedTrainingError(f"{dead[0].name} exited ({_how(dead[0].exitcode)}) while starting")
        if time.monotonic() > deadline:
            raise DistributedTrainingError(f"ranks did not start within {STARTUP_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)


def _failed_children(children: list[Any], exc: BaseException) -> str:
    """Which children died on their own: rank 0's failure is then theirs (a collective found them gone)."""
    if isinstance(exc, dist.DistError):
        # A peer's death reaches rank 0 as a failed collective, maybe a moment before its exit code.
        multiprocessing.connection.wait([child.sentinel for child in children], timeout=_DEATH_NOTICE_SECONDS)
    return ", ".join(
        f"{child.name} {_how(child.exitcode)}" for child in children if child.exitcode not in (None, 0)
    )


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _stop(children: list[Any]) -> None:
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join(_GRACE_SECONDS)
        if child.is_alive():
            child.kill()
            child.join()


def _finish(children: list[Any]) -> None:
    """The children end once the last collective is done; rank 0 has its result by then."""
    for child in children:
        child.join(_GRACE_SECONDS)
        if child.exitcode != 0:
            log.warning("%s %s after the run completed", child.name, _how(child.exitcode))
    _stop(children)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
