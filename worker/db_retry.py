"""Riding out a database outage in a training job: its writes retried with backoff, for a bounded time.

A worker that loses the database mid-job keeps training state in memory; what it cannot do is
record a step, a checkpoint or the final status. Each such write is re-run whole (after a
rollback, which also drops the session's half-done changes) until it commits or the budget is
spent; then the error propagates and the job is left to the sweeper, which resumes it from its
last checkpoint. Writes must therefore be safe to run twice: upserts, compare-and-set transitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from worker.training.data import DataStats
from worker.training.loop import NoCallbacks

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 5.0


def is_outage(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (not a bad statement)."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retrying(
    session: Session,
    write: Callable[[], T],
    *,
    budget_seconds: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`write()`, re-run after a rollback while the database is unreachable, for up to `budget_seconds`."""
    deadline = time.monotonic() + budget_seconds
    delay = FIRST_DELAY_SECONDS
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_outage(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, _first_line(exc), delay)
        _rollback(session)
        sleep(delay)
        delay = min(delay * 2, MAX_DELAY_SECONDS)


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception as exc:
        if not is_outage(exc):
            raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RetryingCallbacks(NoCallbacks):
    """Wraps a job's training callbacks so that each one rides out a database outage."""

    def __init__(self, inner: NoCallbacks, session: Session, *, budget_seconds: float, job_id: int) -> None:
        self._inner, self._session = inner, session
        self._budget, self._job_id = budget_seconds, job_id

    def on_data(self, stats: DataStats) -> None:
        self._retry(lambda: self._inner.on_data(stats), "recording data stats")

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self._retry(lambda: self._inner.on_step(step, total_steps, metrics), f"recording step {step}")

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._retry(lambda: self._inner.on_checkpoint(step, path), f"storing the checkpoint of step {step}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._retry(lambda: self._inner.on_eval(step, metrics), f"recording the eval of step {step}")

    def on_phase(self, step: int, phase: str, detail: str) -> None:
        self._retry(lambda: self._inner.on_phase(step, phase, detail), f"recording the {phase} phase")

    def should_stop(self) -> bool:
        return self._retry(self._inner.should_stop, "checking for a cancel")

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return retrying(self._session, call, budget_seconds=self._budget, what=f"job {self._job_id}: {what}")
