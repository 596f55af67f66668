"""The fine-tuning job state machine: the one place a job (and its adapter version) changes status.

Legal transitions::

    queued   → training    a worker took the first delivery
    queued   → canceled    cancelled before any worker started it
    queued   → errored     refused before training (e.g. its dataset was deleted meanwhile)
    training → completed   the adapter is stored
    training → errored     training raised; `error` is shown to the user
    training → stopping    a cancel was requested; the worker stops within one step
    stopping → canceled    the worker honoured the cancel (the last checkpoint is kept)
    stopping → errored     training failed before it could stop
    stopping → completed   the last step finished before the cancel was seen: the adapter is whole

Everything else is refused with a `ConflictError` naming both states; completed, errored and
canceled are final. A crash is not a transition: a redelivered job stays `training` (or
`stopping`), `start_attempt` records a `restart` event and bumps `attempt`, and training resumes
from `latest_checkpoint`. A worker holds a running job by a lease (`heartbeat_at`, refreshed
while it trains); only a delivery that finds the lease expired may resume the job. A job whose
worker was lost `max_attempts` times is given up (`training`/`stopping` → `errored`, see
`give_up_lost`) instead of being resumed yet again: a run that is OOM-killed at the same step would
otherwise be redelivered forever.

Status writes are compare-and-set (`UPDATE ... WHERE status = <expected>`), so of two racing
writers (a cancel and a worker starting the job) exactly one wins on Postgres and SQLite alike.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from tuneforge.rules.metrics import STEP_METRIC_FIELDS

from app.db import FinetuningJob, JobCheckpoint, JobEvent, JobMetric, Tenant
from app.db.base import utcnow
from app.db.jobs import JobEventKind, JobStatus
from app.errors import ConflictError

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.TRAINING, JobStatus.CANCELED, JobStatus.ERRORED}),
    JobStatus.TRAINING: frozenset({JobStatus.COMPLETED, JobStatus.ERRORED, JobStatus.STOPPING}),
    JobStatus.STOPPING: frozenset({JobStatus.CANCELED, JobStatus.ERRORED, JobStatus.COMPLETED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.ERRORED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}
FINAL_STATUSES = frozenset(s for s, targets in TRANSITIONS.items() if not targets)

Row = TypeVar("Row", JobMetric, JobCheckpoint)

# Metric fields a worker may report for a step; anything else is a programming error.
METRIC_FIELDS = frozenset(STEP_METRIC_FIELDS)


def transition(
    session: Session, job: FinetuningJob, new_status: JobStatus, *, error: str | None = None
) -> None:
    """Move `job` and its version to `new_status`, or raise `ConflictError` if that is not legal."""
    current = JobStatus(job.status)
    if new_status not in TRANSITIONS[current]:
        raise ConflictError(f"job cannot move from {current} to {new_status}")
    now = utcnow()
    values: dict[str, Any] = {"status": new_status}
    if new_status == JobStatus.TRAINING:
        values["started_at"] = now
    if new_status in FINAL_STATUSES:
        values["finished_at"] = now
    if error is not None:
        values["error"] = error
    session.flush()  # pending attribute changes must not be overwritten by the refresh below
    moved = cast(
        "CursorResult[Any]",
        session.execute(
            update(FinetuningJob)
            .where(FinetuningJob.id == job.id, FinetuningJob.status == current)
            .values(**values)
            .execution_options(synchronize_session=False),
        ),
    )
    if moved.rowcount != 1:
        # Another writer moved it first; report the state it is really in.
        session.refresh(job)
        raise ConflictError(f"job cannot move from {job.status} to {new_status}")
    for key, value in values.items():
        set_committed_value(job, key, value)  # already written by the UPDATE above
    session.expire(job, ["updated_at"])  # stamped by the UPDATE's onupdate default
    job.version.status = new_status
    if error is not None:
        job.version.error = error
    add_event(session, job, JobEventKind.STATUS, error or "", status=str(new_status))
    session.flush()


def add_event(session: Session, job: FinetuningJob, kind: JobEventKind, message: str, **data: Any) -> None:
    session.add(JobEvent(job_id=job.id, kind=kind, message=message, data=data))


class AttemptsExhaustedError(ConflictError):
    """The delivery found a job lost too often and ended it `errored` in the caller's session: commit."""


def lost_too_often(job: FinetuningJob, max_attempts: int) -> bool:
    """Every one of the job's `max_attempts` deliveries so far started and then lost its worker."""
    return job.status in (JobStatus.TRAINING, JobStatus.STOPPING) and job.attempt >= max_attempts


def give_up_lost(session: Session, job: FinetuningJob) -> None:
    """End a job whose worker was lost on every attempt; its checkpoints stay: the version serves the last."""
    transition(session, job, JobStatus.ERRORED, error=f"worker lost {job.attempt} times (out of memory?)")


def start_attempt(
    session: Session,
    job: FinetuningJob,
    *,
    worker_id: str,
    lease_seconds: float,
    max_attempts: int | None = None,
) -> bool:
    """A worker received the job: start it, or (redelivery after a lost worker) resume it.

    Returns True when this is a restart. Raises `ConflictError` for a final job, and for a job
    whose lease another live worker still holds (a duplicate delivery); the worker acks and drops
    such a delivery. Taking an expired lease is compare-and-set, so of two redeliveries racing
    for an orphaned job exactly one resumes it. A job that already lost its worker `max_attempts`
    times is ended `errored` instead, and `AttemptsExhaustedError` says so (commit, then drop it).
    """
    if job.status in FINAL_STATUSES:
        raise ConflictError(f"job already {job.status}")
    now = utcnow()
    if job.status == JobStatus.QUEUED:
        transition(session, job, JobStatus.TRAINING)
        restart = False
    else:
        _take_expired_lease(session, job, worker_id, now - timedelta(seconds=lease_seconds))
        if max_attempts is not None and lost_too_often(job, max_attempts):
            give_up_lost(session, job)
            raise AttemptsExhaustedError(f"job given up: {job.error}")
        checkpoint = latest_checkpoint(session, job)
        resume_step = checkpoint.step if checkpoint is not None else 0
        add_event(
            session,
            job,
            JobEventKind.RESTART,
            f"attempt {job.attempt + 1} on {worker_id} after {job.worker_id or 'a worker'} was lost; "
            f"resuming from step {resume_step}",
            attempt=job.attempt + 1,
            previous_worker=job.worker_id,
            resume_step=resume_step,
        )
        restart = True
    job.attempt += 1
    job.worker_id = worker_id
    job.heartbeat_at = now
    session.flush()
    return restart


def _take_expired_lease(session: Session, job: FinetuningJob, worker_id: str, cutoff: datetime) -> None:
    taken = cast(
        "CursorResult[Any]",
        session.execute(
            update(FinetuningJob)
            .where(
                FinetuningJob.id == job.id,
                FinetuningJob.status == job.status,
                or_(FinetuningJob.heartbeat_at.is_(None), FinetuningJob.heartbeat_at < cutoff),
            )
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False),
        ),
    )
    if taken.rowcount != 1:
        session.refresh(job)
        raise ConflictError(f"job is held by {job.worker_id or 'another worker'}, whose lease is live")


def heartbeat(session: Session, job_id: int, worker_id: str) -> bool:
    """Refresh the lease; False when this worker no longer holds the job (it was taken over)."""
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(FinetuningJob)
            .where(FinetuningJob.id == job_id, FinetuningJob.worker_id == worker_id)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False),
        ),
    )
    return result.rowcount == 1


def request_cancel(session: Session, job: FinetuningJob) -> None:
    """Queued jobs cancel at once; a training job is asked to stop; a finished one is a 409."""
    if job.status == JobStatus.QUEUED:
        transition(session, job, JobStatus.CANCELED)
    elif job.status == JobStatus.TRAINING:
        job.cancel_requested_at = utcnow()
        transition(session, job, JobStatus.STOPPING)
    elif job.status == JobStatus.STOPPING:
        return  # already being honoured; a repeated click is not an error
    else:
        raise ConflictError(f"job already {job.status}")


def stop_requested(session: Session, job_id: int) -> bool:
    """Whether the training job has been asked to stop (a cancel, or a stop already under way).

    One indexed primary-key read: cheap enough to ask before every optimizer step.
    """
    status, requested = session.execute(
        select(FinetuningJob.status, FinetuningJob.cancel_requested_at).where(FinetuningJob.id == job_id)
    ).one()
    return requested is not None or status == JobStatus.STOPPING


def tenant_uuid(session: Session, job: FinetuningJob) -> str:
    return session.scalars(select(Tenant.uuid).where(Tenant.id == job.tenant_id)).one()


def mark_enqueued(session: Session, job: FinetuningJob) -> None:
    """The broker accepted the job id (again, for a re-send).

    Enqueueing is at-least-once: the id is sent first and marked after, so a crash in between
    means a second send, never none; a worker drops a delivery whose job another worker holds.
    """
    job.enqueued_at = utcnow()
    session.flush()


def queued_unenqueued(session: Session, older_than: datetime) -> list[FinetuningJob]:
    """Queued jobs created before `older_than` whose enqueue never succeeded (broker was down).

    The grace period keeps the sweeper from racing the API's own enqueue right after commit.
    """
    query = (
        select(FinetuningJob)
        .where(
            FinetuningJob.status == JobStatus.QUEUED,
            FinetuningJob.enqueued_at.is_(None),
            FinetuningJob.created_at < older_than,
        )
        .order_by(FinetuningJob.created_at, FinetuningJob.id)
    )
    return list(session.scalars(query).unique())


def orphaned(session: Session, lease_cutoff: datetime) -> list[FinetuningJob]:
    """Running jobs whose worker stopped heartbeating before `lease_cutoff`, not re-sent since then."""
    query = (
        select(FinetuningJob)
        .where(
            FinetuningJob.status.in_([JobStatus.TRAINING, JobStatus.STOPPING]),
            FinetuningJob.heartbeat_at < lease_cutoff,
            or_(FinetuningJob.enqueued_at.is_(None), FinetuningJob.enqueued_at < lease_cutoff),
        )
        .order_by(FinetuningJob.heartbeat_at, FinetuningJob.id)
    )
    return list(session.scalars(query).unique())


def record_metric(
    session: Session,
    job: FinetuningJob,
    step: int,
    *,
    task_metrics: dict[str, float] | None = None,
    **values: float | int | None,
) -> JobMetric:
    """Store the step's metrics; a re-report of the step (after a restart) updates its row.

    Only the given, non-None fields are written, so an eval report merges with the train report; the
    task metrics merge key by key the same way.
    """
    unknown = set(values) - METRIC_FIELDS
    if unknown:
        raise TypeError(f"unknown metric fields: {sorted(unknown)}")
    given: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
    given["attempt"] = max(job.attempt, 1)
    row = _upsert(session, JobMetric, job, step, given)
    if task_metrics:  # merged into the row _upsert found or made (a new dict: JSON columns track assignment)
        row.task_metrics = (row.task_metrics or {}) | task_metrics
    job.steps_done = step
    session.flush()
    return row


def record_checkpoint(
    session: Session, job: FinetuningJob, step: int, prefix: str, files: dict[str, dict[str, Any]]
) -> JobCheckpoint:
    """Register a checkpoint written to storage; writing the same step again replaces its record."""
    return _upsert(session, JobCheckpoint, job, step, {"prefix": prefix, "files": files})


def _upsert(session: Session, model: type[Row], job: FinetuningJob, step: int, values: dict[str, Any]) -> Row:
    """Select-then-insert-or-update on the (job_id, step) key, portable across Postgres and SQLite."""
    query = select(model).where(model.job_id == job.id, model.step == step)
    row = session.scalar(query)
    if row is None:
        try:
            with session.begin_nested():  # a savepoint: a lost insert race leaves the session usable
                row = model(job_id=job.id, step=step, **values)
                session.add(row)
            return row
        except IntegrityError:
            row = session.scalars(query).one()
    for key, value in values.items():
        setattr(row, key, value)
    session.flush()
    return row


def metrics(session: Session, job: FinetuningJob) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.step)))


def checkpoint_number(session: Session, checkpoint: JobCheckpoint) -> int:
    """1 for the job's first checkpoint, 2 for the next, ... (what the SDK's progress table shows)."""
    earlier = select(func.count()).where(
        JobCheckpoint.job_id == checkpoint.job_id, JobCheckpoint.step <= checkpoint.step
    )
    return int(session.scalar(earlier) or 0)


def prune_checkpoints(session: Session, job: FinetuningJob, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoint rows of `job`; return their storage prefixes.

    Only the rows go here: the caller deletes the blobs after committing, so a crash in between
    leaves unreferenced bytes rather than a row pointing at deleted files.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint a restart resumes from), got {keep}")
    older = list(
        session.scalars(
            select(JobCheckpoint)
            .where(JobCheckpoint.job_id == job.id)
            .order_by(JobCheckpoint.step.desc())
            .offset(keep)
        )
    )
    for checkpoint in older:
        session.delete(checkpoint)
    session.flush()
    return [checkpoint.prefix for checkpoint in older]


def checkpoint_at(session: Session, job: FinetuningJob, step: int) -> JobCheckpoint | None:
    return session.scalar(
        select(JobCheckpoint).where(JobCheckpoint.job_id == job.id, JobCheckpoint.step == step)
    )


def checkpoint_steps(session: Session, job: FinetuningJob) -> list[int]:
    query = select(JobCheckpoint.step).where(JobCheckpoint.job_id == job.id).order_by(JobCheckpoint.step)
    return list(session.scalars(query))


def latest_checkpoint(session: Session, job: FinetuningJob) -> JobCheckpoint | None:
    return session.scalar(
        select(JobCheckpoint).where(JobCheckpoint.job_id == job.id).order_by(JobCheckpoint.step.desc())
    )


def timeline(session: Session, job: FinetuningJob) -> dict[str, dict[str, str]]:
    """Predibase's `{<status>: {"startedAt": iso}}`: when each status was first entered.

    Restarts after a lost worker appear too, as `restart-<attempt>` with what was resumed, and training
    phases (turbo types' speculator phase) as `<phase>-phase`: when it began, and its latest news; the
    placement at submission as `placement` (the worker class, the memory estimate, a config change).
    """
    kinds = [JobEventKind.STATUS, JobEventKind.RESTART, JobEventKind.PHASE, JobEventKind.PLACEMENT]
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.kind.in_(kinds))
        .order_by(JobEvent.created_at, JobEvent.id)
    )
    # A job is queued from its creation; no event records entering the first status.
    result = {str(JobStatus.QUEUED): {"startedAt": _iso(job.created_at)}}
    for event in events:
        if event.kind == JobEventKind.RESTART:
            entry = {"startedAt": _iso(event.created_at), "detail": event.message}
            result[f"restart-{event.data.get('attempt')}"] = entry
        elif event.kind == JobEventKind.PLACEMENT:
            result["placement"] = {"startedAt": _iso(event.created_at), "detail": event.message}
        elif event.kind == JobEventKind.PHASE:
            began = {"startedAt": _iso(event.created_at)}
            result.setdefault(f"{event.data.get('phase')}-phase", began)["detail"] = event.message
        else:
            result.setdefault(str(event.data.get("status")), {"startedAt": _iso(event.created_at)})
    return result


def _iso(moment: datetime) -> str:
    # SQLite hands timestamps back without a zone even though they were stored in UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()
