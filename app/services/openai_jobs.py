"""OpenAI fine-tuning jobs over tuneforge's: the request mapped onto a FinetuningConfig and a repo, and
the cursor pages of jobs, their events (timeline and per-step metrics, newest first) and checkpoints.

A job's OpenAI id is `ftjob-<its uuid as hex>`; its adapter lands in the repo named by `suffix`
(or DEFAULT_REPO) as `repo/N`, which is `fine_tuned_model` once the job succeeds.
"""

from __future__ import annotations

import uuid as uuid_lib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from tuneforge.config import DEFAULT_LEARNING_RATES
from tuneforge.rules.datasets import (
    SPLIT_COLUMN,
    format_columns,
    kind_of_columns,
    kinds_for_task_message,
    task_takes_kind,
)

from app.context import AppContext
from app.db import Dataset, DatasetStatus, FinetuningJob, JobCheckpoint, JobEvent, JobMetric, User
from app.errors import InvalidInputError, NotFoundError
from app.services import base_models, finetuning, openai_files, repos
from app.services.names import validate_name

T = TypeVar("T")
JOB_PREFIX = "ftjob-"
DEFAULT_REPO = "openai-fine-tunes"
METHOD_TASKS = {"supervised": "sft", "dpo": "dpo"}
DEFAULT_ADAPTER = "lora"


@dataclass(frozen=True)
class JobRequest:
    """What an OpenAI create-job request asks for, after its shape was checked (api/openai_schemas)."""

    model: str
    training_file: str
    validation_file: str | None
    method: str  # supervised | dpo
    # n_epochs, batch_size, learning_rate_multiplier[, beta]: "auto" or a value
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int | None
    metadata: dict[str, str] | None


def job_id(job: FinetuningJob) -> str:
    return JOB_PREFIX + uuid_lib.UUID(job.uuid).hex


def get(session: Session, user: User, ref: str, param: str = "fine_tuning_job_id") -> FinetuningJob:
    hex_part = ref.removeprefix(JOB_PREFIX) if ref.startswith(JOB_PREFIX) else ""
    try:
        job_uuid = str(uuid_lib.UUID(hex=hex_part)) if len(hex_part) == 32 else ""
    except ValueError:
        job_uuid = ""
    try:
        return finetuning.get(session, user, job_uuid)
    except NotFoundError:
        raise NotFoundError(f"{param}: no fine-tuning job {ref[:80]!r}") from None


def create(ctx: AppContext, session: Session, user: User, request: JobRequest) -> FinetuningJob:
    task = METHOD_TASKS.get(request.method)
    if task is None:
        raise InvalidInputError(
            f"method.type: {request.method!r} is not trained here; use 'supervised' or 'dpo'"
        )
    dataset = _trainable_file(session, user, request.training_file, task, request.method)
    held_out = None
    if request.validation_file is not None:
        held_out = _validation_file(session, user, request, dataset, task)
    repo_name = validate_name(request.suffix, "suffix") if request.suffix is not None else DEFAULT_REPO
    params = config_params(request, task)
    # Checked before the repo is made, so that a refused request leaves nothing behind.
    finetuning.validate_params(params)
    base_models.require_available(ctx.settings, session, request.model, field="model")
    repo = repos.create(session, user, repo_name, None, exists_ok=True)
    return finetuning.create_job(
        ctx,
        session,
        user,
        params=params,
        dataset_ref=dataset.uuid,
        repo_ref=repo.uuid,
        description=f"OpenAI fine-tuning job ({request.method}) on {request.training_file}",
        eval_dataset=held_out,
        labels=request.metadata,
    )


def config_params(request: JobRequest, task: str) -> dict[str, Any]:
    """The FinetuningConfig fields the request sets; "auto" leaves a field at tuneforge's default."""
    chosen = {k: v for k, v in request.hyperparameters.items() if v is not None and v != "auto"}
    params: dict[str, Any] = {"base_model": request.model, "task": task, "adapter": DEFAULT_ADAPTER}
    if "n_epochs" in chosen:
        params["epochs"] = chosen["n_epochs"]
    if "batch_size" in chosen:
        params["effective_batch_size"] = chosen["batch_size"]
        params["micro_batch_size"] = min(4, chosen["batch_size"])  # a batch below the default micro batch
    if "learning_rate_multiplier" in chosen:
        params["learning_rate"] = DEFAULT_LEARNING_RATES[DEFAULT_ADAPTER] * chosen["learning_rate_multiplier"]
    if "beta" in chosen:
        params["beta"] = chosen["beta"]
    if request.seed is not None:
        params["seed"] = request.seed
    return params


def _trainable_file(
    session: Session, user: User, ref: str, task: str, method: str, field: str = "training_file"
) -> Dataset:
    dataset = openai_files.get(session, user, ref, field)
    if dataset.status == DatasetStatus.VALIDATING:
        raise InvalidInputError(
            f"{field}: {ref} is still being processed; create the job once GET /v1/files/{ref} "
            "says status 'processed'"
        )
    if dataset.status == DatasetStatus.ERRORED:
        raise InvalidInputError(f"{field}: {ref} could not be read: {dataset.last_error}")
    kind = kind_of_columns(dataset.columns or [])
    if kind is None or not task_takes_kind(task, kind):
        other = "dpo" if method == "supervised" else "supervised"
        raise InvalidInputError(
            f"{field}: method {method!r} trains on rows with {kinds_for_task_message(task)}; "
            f"{ref} holds {kind or 'unrecognised'} rows (columns {', '.join(dataset.columns or [])}); "
            f"upload such a file, or use method {{'type': {other!r}}} if this file is meant for it"
        )
    return dataset


def _validation_file(
    session: Session, user: User, request: JobRequest, training: Dataset, task: str
) -> Dataset:
    """The file whose rows the run evaluates on: of the training file's kind, and the only source of
    held-out rows (a training file that splits its own rows would leave two answers)."""
    ref = request.validation_file or ""
    held_out = _trainable_file(session, user, ref, task, request.method, "validation_file")
    if held_out.id == training.id:
        raise InvalidInputError(
            "validation_file: is the training file; evaluating on the rows the run trains on measures "
            "nothing. Upload held-out rows as their own file, or leave validation_file out"
        )
    for ref_of, dataset in ((request.training_file, training), (ref, held_out)):
        if SPLIT_COLUMN in (dataset.columns or []):
            raise InvalidInputError(
                f"validation_file: {ref_of} has a {SPLIT_COLUMN!r} column, and with a validation_file "
                "every row of the training file trains and every row of the validation file is held "
                "out; drop that column, or leave validation_file out and let the column say which rows "
                "are held out"
            )
    wanted, given = format_columns(training.columns or []), format_columns(held_out.columns or [])
    if wanted != given:
        raise InvalidInputError(
            f"validation_file: its rows are read from columns {', '.join(sorted(given))} and the training "
            f"file's from {', '.join(sorted(wanted))}; the run evaluates on rows of the shape it trains on, "
            "so give the validation rows the training file's columns"
        )
    return held_out


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    has_more: bool


def list_jobs(
    session: Session, user: User, limit: int, after: str | None, labels: dict[str, str] | None = None
) -> Page[FinetuningJob]:
    """The caller's jobs, newest first, after the job `after`; with `labels`, those whose metadata has
    every pair."""
    where = [FinetuningJob.tenant_id == user.tenant_id]
    if after is not None:
        cursor = get(session, user, after, "after")
        where.append(_older(FinetuningJob, cursor.created_at, cursor.id))
    newest_first = (FinetuningJob.created_at.desc(), FinetuningJob.id.desc())
    if labels:
        # Matched here rather than in SQL: SQLite's JSON paths cannot name every key a caller may use
        # (one with a double quote matches nothing there). Only ids and metadata are read to find them.
        found = session.execute(
            select(FinetuningJob.id, FinetuningJob.labels).where(*where).order_by(*newest_first)
        )
        ids = [job_id for job_id, given in found if _has_labels(given, labels)][: limit + 1]
        where.append(FinetuningJob.id.in_(ids))
    query = select(FinetuningJob).where(*where).order_by(*newest_first).limit(limit + 1)
    rows = list(session.scalars(query).unique())
    return Page(rows[:limit], len(rows) > limit)


def _has_labels(given: dict[str, str] | None, wanted: dict[str, str]) -> bool:
    return given is not None and all(given.get(key) == value for key, value in wanted.items())


def _older(model: Any, created_at: datetime, row_id: int) -> Any:
    return or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < row_id))


# Event ids say which table a row is from: `ftevent-e<id>` a timeline event, `ftevent-m<id>` a step's metrics.
EVENT_PREFIX = "ftevent-"


def event_id(row: JobEvent | JobMetric) -> str:
    return f"{EVENT_PREFIX}{'e' if isinstance(row, JobEvent) else 'm'}{row.id}"


def list_events(
    session: Session, job: FinetuningJob, limit: int, after: str | None
) -> Page[JobEvent | JobMetric]:
    """Timeline events and metric rows merged newest first (ties: metrics before events, then by id)."""
    events = select(JobEvent).where(JobEvent.job_id == job.id)
    metrics = select(JobMetric).where(JobMetric.job_id == job.id)
    if after is not None:
        cursor = _event_at(session, job, after)
        older_events = _older(JobEvent, cursor.created_at, cursor.id)
        older_metrics = _older(JobMetric, cursor.created_at, cursor.id)
        if isinstance(cursor, JobEvent):  # metrics sort before events at one instant
            events = events.where(older_events)
            metrics = metrics.where(JobMetric.created_at < cursor.created_at)
        else:
            events = events.where(or_(older_events, JobEvent.created_at == cursor.created_at))
            metrics = metrics.where(older_metrics)
    newest = (JobEvent.created_at.desc(), JobEvent.id.desc())
    rows: list[JobEvent | JobMetric] = list(session.scalars(events.order_by(*newest).limit(limit + 1)))
    metric_order = (JobMetric.created_at.desc(), JobMetric.id.desc())
    rows += list(session.scalars(metrics.order_by(*metric_order).limit(limit + 1)))
    rows.sort(key=lambda r: (r.created_at, isinstance(r, JobMetric), r.id), reverse=True)
    return Page(rows[:limit], len(rows) > limit)


def _event_at(session: Session, job: FinetuningJob, ref: str) -> JobEvent | JobMetric:
    body = ref.removeprefix(EVENT_PREFIX) if ref.startswith(EVENT_PREFIX) else ""
    number = int(body[1:]) if body[1:].isdigit() and len(body) <= 20 else None
    row: JobEvent | JobMetric | None = None
    if number is not None and body[:1] == "e":
        row = session.scalar(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id == number))
    elif number is not None and body[:1] == "m":
        row = session.scalar(select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.id == number))
    if row is None:
        raise NotFoundError(f"after: no event {ref[:80]!r} of this job")
    return row


def list_checkpoints(
    session: Session, job: FinetuningJob, limit: int, after: str | None
) -> Page[JobCheckpoint]:
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)
    if after is not None:
        body = after.removeprefix(CHECKPOINT_PREFIX) if after.startswith(CHECKPOINT_PREFIX) else ""
        cursor = None
        if body.isdigit() and len(body) <= 20:
            cursor = session.scalar(query.where(JobCheckpoint.id == int(body)))
        if cursor is None:
            raise NotFoundError(f"after: no checkpoint {after[:80]!r} of this job")
        query = query.where(JobCheckpoint.step < cursor.step)
    rows = list(session.scalars(query.order_by(JobCheckpoint.step.desc()).limit(limit + 1)))
    return Page(rows[:limit], len(rows) > limit)


CHECKPOINT_PREFIX = "ftckpt-"


def metrics_at(session: Session, job: FinetuningJob, steps: list[int]) -> dict[int, JobMetric]:
    if not steps:
        return {}
    rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step.in_(steps)))
    return {row.step: row for row in rows}


def trained_tokens(session: Session, job: FinetuningJob) -> int | None:
    """Tokens the run trained on: the last step's running count, as the worker reports it."""
    return session.scalar(
        select(JobMetric.tokens)
        .where(JobMetric.job_id == job.id, JobMetric.tokens.is_not(None))
        .order_by(JobMetric.step.desc())
        .limit(1)
    )
