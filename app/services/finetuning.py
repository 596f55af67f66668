"""Accepting fine-tuning jobs: validate the request, commit a queued job and version, then enqueue.

Nothing accepted is lost: the job and its `queued` version are committed before the broker is
asked; if the broker is down the job simply stays queued with no `enqueued_at`, and the sweeper
(`app.services.job_sweeper`) sends it once the broker is back.
"""

from __future__ import annotations

import logging
import math
import uuid as uuid_lib
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tuneforge.config import FinetuningConfig
from tuneforge.config_errors import config_errors
from tuneforge.rules.base_models import EAGLE_MODEL_TYPES
from tuneforge.rules.datasets import TASK_DATASET_KINDS, Split, kinds_for_task_message, task_takes_kind

from app.context import AppContext
from app.db import AdapterVersion, Dataset, DatasetStatus, FinetuningJob, JobEventKind, User, VersionSource
from app.errors import InvalidInputError, NotFoundError
from app.queue import EnqueueError
from app.services import base_models, continuation, datasets, jobs, placement, quotas, repos

log = logging.getLogger(__name__)


def validate_params(params: dict[str, Any]) -> FinetuningConfig:
    """The request's `params` as a config, or a 422 that names every offending field."""
    try:
        return FinetuningConfig.model_validate(params)
    except ValidationError as exc:
        # A check across fields has no field of its own; its message starts with the one it names.
        problems = (
            f"params.{field}: {message}" if field else f"params.{message}"
            for field, message in config_errors(exc)
        )
        raise InvalidInputError("; ".join(problems)) from None


def create_job(
    ctx: AppContext,
    session: Session,
    user: User,
    *,
    params: dict[str, Any],
    dataset_ref: str,
    repo_ref: str,
    description: str | None = None,
    continue_from_version: str | None = None,
    eval_dataset: Dataset | None = None,
    labels: dict[str, str] | None = None,
) -> FinetuningJob:
    """`eval_dataset`: a second connected dataset whose rows are the run's held-out split (the caller
    checked that its rows are of the training dataset's kind, and that the training dataset names no
    split of its own). `labels`: the caller's key-value strings, stored with the job as given (bounded
    by the caller's schema)."""
    parent = continuation.resolve(session, user, continue_from_version) if continue_from_version else None
    config = validate_params(continuation.params(parent, params) if parent is not None else params)
    base_model, found = _base_model(ctx, session, config)
    dataset = _connected_dataset(session, user, dataset_ref)
    _require_task_fits(config, dataset)
    repo = repos.get(session, user, repo_ref)
    _require_quotas(ctx, session, user)
    placed = placement.place(ctx.settings, config, base_model, found.config)
    config = placed.config  # gradient checkpointing on, when that is what made the job fit
    stored = config.model_dump(mode="json")
    version = AdapterVersion(
        repo_id=repo.id,
        created_by_id=user.id,
        tag=repos.allocate_tag(session, repo),
        source=VersionSource.FINETUNE,
        adapter_type=config.adapter,
        base_model=base_model,
        config=stored,
        description=description,
        parent_version_id=parent.version.id if parent is not None else None,
        parent_checkpoint_step=parent.checkpoint_step if parent is not None else None,
    )
    session.add(version)
    session.flush()
    job = FinetuningJob(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        repo_id=repo.id,
        version_id=version.id,
        dataset_id=dataset.id,
        eval_dataset_id=eval_dataset.id if eval_dataset is not None else None,
        eval_dataset_name=eval_dataset.name if eval_dataset is not None else None,
        labels=labels,
        dataset_name=dataset.name,
        base_model=base_model,
        adapter_type=config.adapter,
        params=stored,
        description=description,
        total_steps=_planned_steps(config, dataset, held_out_elsewhere=eval_dataset is not None),
        worker_class=placed.worker_class,
        placement=placed.record,
    )
    session.add(job)
    session.flush()
    _record_placement(session, job, placed)
    session.commit()
    enqueue(ctx, session, job)
    return job


def _require_quotas(ctx: AppContext, session: Session, user: User) -> None:
    """429 past the tenant's job or storage limit; holds the tenant's job-count lock until the commit."""
    settings = ctx.settings
    quotas.require_storage_room(session, user.tenant_id, settings.tenant_max_stored_bytes)
    quotas.require_job_slot(session, user.tenant_id, settings.tenant_max_active_jobs)


def _record_placement(session: Session, job: FinetuningJob, placed: placement.Placement) -> None:
    """The placement in the job's events, so its timeline says where it went and what was changed."""
    estimate = placed.record.get("estimate")
    if estimate is None:
        message = f"sent to the default train queue ({placed.record.get('reason')})"
    else:
        where = f"worker class {placed.worker_class}" if placed.worker_class else "the default train queue"
        message = f"estimated peak training memory ~{estimate['total_gib']} GiB per device; sent to {where}"
    if placed.turned_on_checkpointing:
        message += "; gradient_checkpointing was turned on because the job fits this class only with it"
    jobs.add_event(session, job, JobEventKind.PLACEMENT, message, worker_class=placed.worker_class)


def enqueue(ctx: AppContext, session: Session, job: FinetuningJob) -> bool:
    """Send the committed job's id to the queue of its recorded worker class; False (job left for the
    sweeper, which sends it the same way) if the broker is down."""
    try:
        ctx.queue.send_train(job.id, placement.queue_for(ctx.settings, job.worker_class))
    except EnqueueError as exc:
        log.warning("job %s stays queued until the broker is back: %s", job.uuid, exc)
        return False
    jobs.mark_enqueued(session, job)
    session.commit()
    return True


def _base_model(
    ctx: AppContext, session: Session, config: FinetuningConfig
) -> tuple[str, base_models.AvailableModel]:
    """The run's base model, which must be one the workers can load; inherited when continuing."""
    if config.base_model is None:
        raise InvalidInputError(
            "params.base_model: required; name a base model (GET /v2/base-models lists them), or continue "
            "from an adapter version (continueFromVersion) to train on its base model"
        )
    found = base_models.require_available(ctx.settings, session, config.base_model)
    _require_servable_speculator(config, found)
    return config.base_model, found


def _require_servable_speculator(config: FinetuningConfig, found: base_models.AvailableModel) -> None:
    """An eagle draft layer the serving engine would refuse for this family is refused before training."""
    eagle = config.adapter in ("turbo", "turbo_lora") and config.speculator_architecture == "eagle"
    if eagle and found.model_type is not None and found.model_type not in EAGLE_MODEL_TYPES:
        raise InvalidInputError(
            "params.speculator_architecture: eagle speculators are served on "
            f"{', '.join(EAGLE_MODEL_TYPES)} models and {found.name} is a {found.model_type!r} model; "
            "set speculator_architecture to 'medusa' for Turbo on it"
        )


def _connected_dataset(session: Session, user: User, ref: str) -> Dataset:
    if not ref or not ref.strip():
        raise InvalidInputError("dataset: required; pass the name of a connected dataset")
    try:
        dataset = datasets.get(session, user, ref)
    except NotFoundError:
        raise NotFoundError(f"dataset: {ref!r} not found; upload it first (pb.datasets.from_file)") from None
    if dataset.status != DatasetStatus.CONNECTED:
        reason = dataset.last_error or "its validation has not finished yet; try again in a moment"
        raise InvalidInputError(f"dataset: {dataset.name!r} is {dataset.status}, not connected: {reason}")
    return dataset


# What a dataset of each kind is, in words a refusal can use.
_KIND_NAMES = {
    "prompt_completion": "prompt + completion dataset",
    "messages": "chat ('messages') dataset",
    "text": "text dataset",
    "preference": "preference-pair dataset",
    "classification": "classification (text + label) dataset",
    "prompt": "prompts-only dataset (a 'prompt' column and no 'completion')",
}


def _require_task_fits(config: FinetuningConfig, dataset: Dataset) -> None:
    """A 422 for a task that cannot train on the dataset's kind, saying what the task needs: found here,
    not minutes later on a worker."""
    task, kind = config.task, dataset.format
    if kind is None or task_takes_kind(task, kind):
        return
    takers = [f"'{other}'" for other, kinds in TASK_DATASET_KINDS.items() if kind in kinds]
    instead = f", or set params.task to {' or '.join(takers)} to train on this one" if takers else ""
    raise InvalidInputError(
        f"params.task: a '{task}' job cannot train on dataset {dataset.name!r}, a "
        f"{_KIND_NAMES.get(kind, repr(kind) + ' dataset')}; task '{task}' needs "
        f"{kinds_for_task_message(task)}. Use a dataset with those columns{instead}"
    )


def _planned_steps(
    config: FinetuningConfig, dataset: Dataset, *, held_out_elsewhere: bool = False
) -> int | None:
    """The run's optimizer steps as far as the control plane can tell; the worker reports the exact count.

    held_out_elsewhere: the evaluation rows come from another dataset, so every row here trains."""
    if config.train_steps is not None:
        return config.train_steps
    counts = dataset.split_counts or {}
    train_rows = counts.get(Split.TRAIN, dataset.row_count or 0)
    if not counts.get(Split.EVALUATION) and config.eval_fraction and not held_out_elsewhere:
        # No held-out rows in the file: the worker holds out eval_fraction of them (seeded).
        train_rows -= max(1, round(train_rows * config.eval_fraction))
    if train_rows < 1:
        return None
    return config.epochs * math.ceil(train_rows / config.batch_size)


def estimate_steps(ctx: AppContext, session: Session, user: User, request: Any) -> int | None:
    """Optimizer steps a job of this shape would run, or None when the request does not say enough.

    The SDK asks before every job and tolerates any answer but a 5xx, so a vague request gets None.
    """
    if not isinstance(request, dict) or not request.get("baseModel"):
        return None
    params = {
        "base_model": request["baseModel"],
        "epochs": request.get("epochs"),
        "train_steps": request.get("trainSteps"),
    }
    try:
        config = FinetuningConfig.model_validate({k: v for k, v in params.items() if v is not None})
        dataset = datasets.get(session, user, str(request.get("datasetName") or ""))
    except (ValidationError, NotFoundError):
        return None
    return _planned_steps(config, dataset)


def get(session: Session, user: User, job_uuid: str) -> FinetuningJob:
    if not _is_uuid(job_uuid):
        # Never a job; and a NUL in it would reach PostgreSQL, which refuses it (a 500, not a 404).
        raise NotFoundError(f"fine-tuning job {job_uuid!r} not found")
    job = session.scalar(
        select(FinetuningJob).where(FinetuningJob.tenant_id == user.tenant_id, FinetuningJob.uuid == job_uuid)
    )
    if job is None:
        raise NotFoundError(f"fine-tuning job {job_uuid!r} not found")
    return job


def _is_uuid(text: str) -> bool:
    try:
        uuid_lib.UUID(text)
    except ValueError:
        return False
    return True


def list_jobs(session: Session, user: User, limit: int, offset: int) -> tuple[list[FinetuningJob], int]:
    owned = FinetuningJob.tenant_id == user.tenant_id
    total = session.scalar(select(func.count()).select_from(FinetuningJob).where(owned)) or 0
    query = (
        select(FinetuningJob).where(owned).order_by(FinetuningJob.created_at.desc(), FinetuningJob.id.desc())
    )
    return list(session.scalars(query.limit(limit).offset(offset)).unique()), total
