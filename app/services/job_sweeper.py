"""The sweeper: (re-)sends jobs the broker never got, and jobs whose worker stopped heartbeating.

Each pass also (re-)sends `validating` datasets (`dataset_validation.sweep`) the same way.

It runs in every control-plane process (a daemon thread started by the app's lifespan). Sends are
at-least-once, so two control planes sweeping together may send a job twice; the worker that
receives the second copy finds the first one's live lease and drops it. A job whose worker was lost
on each of its `job_max_attempts` deliveries is ended `errored` instead of being sent again.

Leases are judged only once the sweeper has reached the database for a whole lease period: while
the database was unreachable no worker could renew its lease either, and a worker that kept
training through the outage renews it within a third of a lease after the database is back.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import FinetuningJob, JobStatus
from app.db.base import utcnow
from app.services import finetuning, jobs
from app.services.dataset_files import validation as dataset_validation

log = logging.getLogger(__name__)

# A job the API enqueues itself right after its commit is not the sweeper's business yet.
ENQUEUE_GRACE_SECONDS = 2.0


def sweep(ctx: AppContext, *, judge_leases: bool = True) -> int:
    """One pass; returns how many jobs were sent. Stops at the first send the broker refuses.

    With `judge_leases` False only jobs the broker never got are sent (see the module docstring).
    """
    now = utcnow()
    lease_cutoff = now - timedelta(seconds=ctx.settings.job_lease_seconds)
    sent = 0
    with ctx.sessions() as session:
        waiting = jobs.queued_unenqueued(session, now - timedelta(seconds=ENQUEUE_GRACE_SECONDS))
        orphans = _resumable(ctx, session, lease_cutoff) if judge_leases else []
        for job in waiting + orphans:
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


def _resumable(ctx: AppContext, session: Session, lease_cutoff: datetime) -> list[FinetuningJob]:
    """Orphaned jobs to send again; those lost on every allowed attempt are ended `errored` here."""
    resumable = []
    for job in jobs.orphaned(session, lease_cutoff):
        if jobs.lost_too_often(job, ctx.settings.job_max_attempts):
            jobs.give_up_lost(session, job)
            session.commit()
            log.warning("job %s: %s; not re-enqueueing it", job.uuid, job.error)
        else:
            resumable.append(job)
    return resumable


class JobSweeper:
    """Calls `sweep` every `interval` seconds on a daemon thread until `stop`."""

    def __init__(self, ctx: AppContext, interval: float) -> None:
        self._ctx = ctx
        self._interval = interval
        # Monotonic time of the first pass that reached the database after a failed one (or ever).
        self._reachable_since: float | None = None
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
                sent = sweep(self._ctx, judge_leases=self._judge_leases())
                if sent:
                    log.info("sweeper sent %d job(s) to the workers", sent)
                sent = dataset_validation.sweep(self._ctx)
                if sent:
                    log.info("sweeper sent %d dataset(s) to the validate workers", sent)
            except Exception:
                # A database blip must not end the sweeping for good; the next pass retries.
                self._reachable_since = None
                log.exception("job sweep failed; retrying in %.1f s", self._interval)

    def _judge_leases(self) -> bool:
        now = time.monotonic()
        if self._reachable_since is None:
            self._reachable_since = now
        return now - self._reachable_since >= self._ctx.settings.job_lease_seconds
