"""`tuneforge worker`: Celery worker nodes for training (one job at a time) and dataset validation.

A plain `tuneforge worker` runs both: the training node in this process and the validate node as a
child process, because a node's pool serves every queue it consumes and the training pool holds
one hours-long job at a time. `--queues train` or `--queues validate` runs one node alone; the
validate node imports no torch, so it also runs from the control-plane image.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Collection
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from app.context import AppContext
from app.settings import Settings
from app.supervision.child_processes import dies_with_parent
from worker.celery_app import make_celery, make_validate_celery, train_queues
from worker.validate_task import limit_memory, register_validate_task

QUEUES = ("train", "validate")
# How long a stopping validate node may finish its validations before it is killed.
_VALIDATE_STOP_TIMEOUT_S = 30.0


def run_worker(
    settings: Settings,
    *,
    queues: Collection[str] = QUEUES,
    loglevel: str = "info",
    name: str | None = None,
) -> None:
    """Blocks until the worker is told to stop (SIGTERM: finish the work; SIGQUIT: stop now)."""
    if set(queues) == {"validate"}:
        _run_validate_node(settings, loglevel, name)
        return
    validator = _start_validate_node(loglevel) if "validate" in queues else None
    try:
        _run_train_node(settings, loglevel, name)
    finally:
        if validator is not None:
            _stop(validator)


def _run_train_node(settings: Settings, loglevel: str, name: str | None) -> None:
    from worker.tasks import register_tasks  # the training stack (torch): only where it trains

    ctx = AppContext.from_settings(settings)
    celery = make_celery(settings)
    register_tasks(celery, ctx)
    # Unique per process, so a job's timeline can tell a restarted worker from the lost one.
    hostname = name or f"tuneforge-{os.getpid()}@{socket.gethostname()}"
    _run_node(celery, ctx, loglevel, hostname, ["-Q", ",".join(train_queues(settings))])


def _run_validate_node(settings: Settings, loglevel: str, name: str | None) -> None:
    ctx = AppContext.from_settings(settings)
    celery = make_validate_celery(settings)
    register_validate_task(celery, ctx)

    @worker_process_init.connect(weak=False)
    def _cap_memory(**_: Any) -> None:
        limit_memory(settings.validation_memory_bytes)

    hostname = name or f"validate-{os.getpid()}@{socket.gethostname()}"
    _run_node(celery, ctx, loglevel, hostname, ["-Q", settings.validate_queue])


def _run_node(celery: Celery, ctx: AppContext, loglevel: str, hostname: str, extra: list[str]) -> None:
    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_: Any) -> None:
        # A forked child must not share the parent's pooled database sockets.
        ctx.engine.dispose(close=False)

    try:
        args = ["worker", f"--loglevel={loglevel}", "--pool=prefork", f"--hostname={hostname}"]
        celery.worker_main([*args, "--without-gossip", *extra])
    finally:
        ctx.close()


def _start_validate_node(loglevel: str) -> subprocess.Popen[bytes]:
    """`tuneforge worker --queues validate` as a child; the same environment gives it the same Settings."""
    tuneforge = [sys.executable, "-m", "tuneforge.cli"]
    command = [*tuneforge, "worker", "--queues", "validate", "--log-level", loglevel]
    # It gets SIGTERM when this process dies, even by SIGKILL, so it is never orphaned.
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=dies_with_parent(signal.SIGTERM))


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # warm shutdown: running validations finish
    try:
        process.wait(timeout=_VALIDATE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
