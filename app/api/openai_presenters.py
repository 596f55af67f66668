"""Rows as the OpenAI SDK's objects: files, fine-tuning jobs, their events and checkpoints."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.orm import Session
from tuneforge.config import DEFAULT_BETA, DEFAULT_LEARNING_RATES, FinetuningConfig

from app.api import openai_schemas as oa
from app.db import Dataset, FinetuningJob, JobCheckpoint, JobEvent, JobEventKind, JobMetric, JobStatus
from app.services import openai_files, openai_jobs

JOB_STATUSES = {
    JobStatus.QUEUED: "queued",
    JobStatus.TRAINING: "running",
    JobStatus.STOPPING: "running",  # a cancel was asked for; it ends `cancelled` within a step
    JobStatus.COMPLETED: "succeeded",
    JobStatus.ERRORED: "failed",
    JobStatus.CANCELED: "cancelled",
}


def epoch(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def file(row: Dataset) -> oa.FileObject:
    status = openai_files.status_of(row)
    return oa.FileObject(
        id=openai_files.file_id(row),
        bytes=row.size_bytes or 0,
        created_at=epoch(row.created_at) or 0,
        filename=row.file_name,
        purpose=openai_files.PURPOSE,
        status=status,  # type: ignore[arg-type]
        status_details=row.last_error if status == "error" else None,
    )


def job(session: Session, row: FinetuningJob) -> oa.FineTuningJob:
    config = FinetuningConfig.model_validate(row.params)
    status = JOB_STATUSES.get(JobStatus(row.status), "queued")
    version = row.version
    succeeded = status == "succeeded"
    suffix = version.repo.name if version.repo.name != openai_jobs.DEFAULT_REPO else None
    error = None
    if status == "failed":
        error = oa.JobError(code="training_failed", message=row.error or "the job failed")
    return oa.FineTuningJob(
        id=openai_jobs.job_id(row),
        created_at=epoch(row.created_at) or 0,
        error=error,
        fine_tuned_model=f"{version.repo.name}/{version.tag}" if succeeded else None,
        finished_at=epoch(row.finished_at),
        hyperparameters=_hyperparameters(config),
        model=row.base_model,
        organization_id=f"org-{row.tenant_id}",
        result_files=[],
        seed=config.seed,
        status=status,  # type: ignore[arg-type]
        trained_tokens=openai_jobs.trained_tokens(session, row) if succeeded else None,
        training_file=_file_of(session, row.dataset_id, row.dataset_name) or "",
        validation_file=_file_of(session, row.eval_dataset_id, row.eval_dataset_name),
        method=_method(config),
        metadata=row.labels,
        user_provided_suffix=suffix,
    )


def _file_of(session: Session, dataset_id: int | None, gone: str | None) -> str | None:
    """The dataset's file id; `gone` once it was deleted (a deleted id no longer names anything)."""
    dataset = session.get(Dataset, dataset_id) if dataset_id is not None else None
    return openai_files.file_id(dataset) if dataset is not None else gone


def _hyperparameters(config: FinetuningConfig) -> dict[str, Any]:
    default_rate = DEFAULT_LEARNING_RATES.get(config.adapter, 2e-4)
    rate = config.learning_rate if config.learning_rate is not None else default_rate
    return {
        "n_epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate_multiplier": round(rate / default_rate, 6),
    }


def _method(config: FinetuningConfig) -> dict[str, Any]:
    hyperparameters = _hyperparameters(config)
    if config.task == "dpo":
        beta = config.beta if config.beta is not None else DEFAULT_BETA["dpo"]
        return {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": beta}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def event(row: JobEvent | JobMetric, total_steps: int | None) -> oa.JobEvent:
    if isinstance(row, JobMetric):
        data = {
            "step": row.step,
            "train_loss": row.train_loss,
            "valid_loss": row.eval_loss,
            "total_steps": total_steps,
            "learning_rate": row.learning_rate,
            "epoch": row.epoch,
        }
        message = f"Step {row.step}" + (f"/{total_steps}" if total_steps else "")
        if row.train_loss is not None:
            message += f": training loss={row.train_loss:.4f}"
        return oa.JobEvent(
            id=openai_jobs.event_id(row),
            created_at=epoch(row.created_at) or 0,
            level="info",
            message=message,
            type="metrics",
            data=data,
        )
    level: Literal["info", "warn", "error"] = "warn" if row.kind == JobEventKind.WARNING else "info"
    message = row.message or row.kind
    if row.kind == JobEventKind.STATUS:
        status = str(row.data.get("status", ""))
        level = "error" if status == JobStatus.ERRORED else level
        shown = JOB_STATUSES.get(JobStatus(status), status) if status in set(JobStatus) else status
        message = f"Job {shown}" + (f": {row.message}" if row.message else "")
    return oa.JobEvent(
        id=openai_jobs.event_id(row),
        created_at=epoch(row.created_at) or 0,
        level=level,
        message=message,
        type="message",
        data=dict(row.data) or None,
    )


def checkpoint(row: JobCheckpoint, job_row: FinetuningJob, metric: JobMetric | None) -> oa.JobCheckpoint:
    version = job_row.version
    metrics = oa.CheckpointMetrics(step=row.step)
    if metric is not None:
        metrics = oa.CheckpointMetrics(
            step=row.step, train_loss=metric.train_loss, valid_loss=metric.eval_loss
        )
    return oa.JobCheckpoint(
        id=f"{openai_jobs.CHECKPOINT_PREFIX}{row.id}",
        created_at=epoch(row.created_at) or 0,
        fine_tuned_model_checkpoint=f"{version.repo.name}/{version.tag}@{row.step}",
        fine_tuning_job_id=openai_jobs.job_id(job_row),
        metrics=metrics,
        step_number=row.step,
    )
