"""Fine-tuning job aggregate: the job row, its event timeline, per-step metrics and checkpoints.

Status changes go through `app.services.jobs` only; these classes hold no transition logic.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, Timestamped, utcnow
from app.db.repos import AdapterVersion, VersionStatus

# One status vocabulary for a job and the version it produces: the version moves in lockstep.
JobStatus = VersionStatus


class JobEventKind(enum.StrEnum):
    STATUS = "status"  # entered a status; the timeline is derived from these
    RESTART = "restart"  # redelivered after a worker was lost; training resumes from a checkpoint
    WARNING = "warning"
    TRUNCATION = "truncation"  # examples cut to the context length
    PHASE = "phase"  # a training phase began or ended (turbo types: the speculator's); in the timeline
    PLACEMENT = "placement"  # the worker class chosen at submission, and a config change it needed


class FinetuningJob(Timestamped, Base):
    __tablename__ = "finetuning_jobs"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    # One job produces exactly one version; the version goes when its repo does, and the job with it.
    version_id: Mapped[int] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE"), unique=True
    )
    # A finished job outlives its dataset; the worker refuses a job whose dataset is gone.
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    # Rows held out for evaluation, from a second dataset (OpenAI's `validation_file`); None: the run
    # holds out rows of `dataset` (its `split` column, or eval_fraction). Gone mid-run: the worker refuses.
    eval_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    eval_dataset_name: Mapped[str | None] = mapped_column(String(255))  # set with it; kept once it is gone
    # The caller's own labels (OpenAI's `metadata`: at most 16 short key-value strings), returned as given.
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # Kept for display after the dataset is deleted (the SDK requires `datasetName`).
    dataset_name: Mapped[str] = mapped_column(String(255), default="", server_default="")
    base_model: Mapped[str] = mapped_column(String(255))
    adapter_type: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the validated config
    # Indexed: the sweeper and the workers' listings filter on it.
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # deliveries to a worker so far
    # Set once the broker accepted the job id; NULL past a grace period means the enqueue was lost.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The lease: the worker holding the job refreshes heartbeat_at; a stale one means the worker is
    # gone, and the sweeper re-enqueues the job so another worker resumes it from its last checkpoint.
    worker_id: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    description: Mapped[str | None] = mapped_column(Text)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    # Placement by memory (app/services/placement.py): the worker class whose queue the job is sent to
    # (None: the default train queue), and the memory estimate behind the choice.
    worker_class: Mapped[str | None] = mapped_column(String(64))
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)

    version: Mapped[AdapterVersion] = relationship(lazy="joined")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("finetuning_jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobMetric(Base):
    """One row per training step; an eval report for a step merges into that step's row.

    Unique per (job, step) so a redelivered job that re-reports steps after its last checkpoint
    overwrites them instead of duplicating the curve.
    """

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("finetuning_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    checkpoint_number: Mapped[int | None] = mapped_column(Integer)
    grad_norm: Mapped[float | None] = mapped_column(Float)  # before clipping
    eval_perplexity: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    # Cumulative non-padding tokens trained on: `tokens` counts padding too, this is the work done.
    useful_tokens: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cuda_allocated_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_utilization: Mapped[float | None] = mapped_column(Float)  # percent, where the driver reports it
    # The task's own metrics of the step (tuneforge.rules.metrics.task_values): rewards, accuracies, KL.
    task_metrics: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # The delivery that last wrote the row: after a restart, steps past the checkpoint show the new one.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobCheckpoint(Base):
    """A resumable training state in storage; `files` maps name → {size, sha256}."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("finetuning_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    prefix: Mapped[str] = mapped_column(String(512))
    files: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
