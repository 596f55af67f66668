"""`tuneforge worker`: a Celery worker on the train queue, one job at a time, in a fresh child per job."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.signals import worker_process_init

from app.context import AppContext
from app.settings import Settings
from worker.celery_app import make_celery
from worker.tasks import register_tasks


def run_worker(settings: Settings, *, loglevel: str = "info", name: str | None = None) -> None:
    """Blocks until the worker is told to stop (SIGTERM: finish the job; SIGQUIT: stop now)."""
    ctx = AppContext.from_settings(settings)

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_: Any) -> None:
        # A forked child must not share the parent's pooled database sockets.
        ctx.engine.dispose(close=False)

    celery = make_celery(settings)
    register_tasks(celery, ctx)
    # Unique per process, so a job's timeline can tell a restarted worker from the lost one.
    hostname = name or f"tuneforge-{os.getpid()}@{socket.gethostname()}"
    try:
        celery.worker_main(
            [
                "worker",
                f"--loglevel={loglevel}",
                "--pool=prefork",
                f"--hostname={hostname}",
                "--without-gossip",
            ]
        )
    finally:
        ctx.close()
