"""The sweeper: (re-)sends jobs the broker never got, and jobs whose worker stopped heartbeating.

Each pass also (re-)sends `validating` datasets (`dataset_validation.sweep`) the same way.

It runs in every control-plane process (a daemon thread started by the app's lifespan). Sends are
at-least-once, so two control planes sweeping together may send a job twice; the worker that
receives the second copy finds the first one's live lease and drops it.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from app.context import AppContext
from app.db import JobStatus
from app.db.base import utcnow
from app.services import dataset_validation, finetuning, jobs

log = logging.getLogger(__name__)

# A job the API enqueues itself right after its commit is not the sweeper's business yet.
ENQUEUE_GRACE_SECONDS = 2.0


def sweep(ctx: AppContext) -> int:
    """One pass; returns how many jobs were sent. Stops at the first send the broker refuses."""
    now = utcnow()
    lease_cutoff = now - timedelta(seconds=ctx.settings.job_lease_seconds)
    sent = 0
    with ctx.sessions() as session:
        waiting = jobs.queued_unenqueued(session, now - timedelta(seconds=ENQUEUE_GRACE_SECONDS))
        for job in waiting + jobs.orphaned(session, lease_cutoff):
            if job.status != JobStatus.QUEUED:
                log.warning(
                    "job %s: worker %s stopped heartbeating at %s; re-enqueueing it to resume from its "
                    "last checkpoint",
                    job.uuid,
                    job.worker_id,
                    job.heartbeat_at,
                )
            if not finetuning.enqueue(ctx, session, job):
                break  # the broker is still down; the next pass tries again
            sent += 1
    return sent


class JobSweeper:
    """Calls `sweep` every `interval` seconds on a daemon thread until `stop`."""

    def __init__(self, ctx: AppContext, interval: float) -> None:
        self._ctx = ctx
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                sent = sweep(self._ctx)
                if sent:
                    log.info("sweeper sent %d job(s) to the workers", sent)
                sent = dataset_validation.sweep(self._ctx)
                if sent:
                    log.info("sweeper sent %d dataset(s) to the validate workers", sent)
            except Exception:
                # A database blip must not end the sweeping for good; the next pass retries.
                log.exception("job sweep failed; retrying in %.1f s", self._interval)
