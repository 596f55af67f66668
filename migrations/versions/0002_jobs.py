"""Fine-tuning jobs with their events, per-step metrics and checkpoints.

Revision ID: 0002_jobs
Revises: 0001_initial
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_jobs"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _fk(column: str, target: str, ondelete: str, nullable: bool = False) -> sa.Column:
    return sa.Column(column, sa.Integer(), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def _stamp(column: str, nullable: bool = True) -> sa.Column:
    return sa.Column(column, sa.DateTime(timezone=True), nullable=nullable)


def _job_child(table: str, *columns: sa.Column | sa.UniqueConstraint) -> None:
    op.create_table(
        table,
        sa.Column("id", sa.Integer(), primary_key=True),
        _fk("job_id", "finetuning_jobs.id", "CASCADE"),
        *columns,
        _stamp("created_at", nullable=False),
    )


def upgrade() -> None:
    op.create_table(
        "finetuning_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        _stamp("created_at", nullable=False),
        _stamp("updated_at", nullable=False),
        _fk("tenant_id", "tenants.id", "CASCADE"),
        _fk("created_by_id", "users.id", "SET NULL", nullable=True),
        _fk("repo_id", "repos.id", "CASCADE"),
        sa.Column(
            "version_id",
            sa.Integer(),
            sa.ForeignKey("adapter_versions.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        _fk("dataset_id", "datasets.id", "SET NULL", nullable=True),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("adapter_type", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _stamp("enqueued_at"),
        _stamp("started_at"),
        _stamp("finished_at"),
        _stamp("cancel_requested_at"),
        sa.Column("worker_id", sa.String(255)),
        sa.Column("description", sa.Text()),
        sa.Column("total_steps", sa.Integer()),
        sa.Column("steps_done", sa.Integer(), nullable=False),
    )
    for column in ("tenant_id", "repo_id", "status"):
        op.create_index(f"ix_finetuning_jobs_{column}", "finetuning_jobs", [column])
    _job_child(
        "job_events",
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    _job_child(
        "job_metrics",
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Float()),
        sa.Column("train_loss", sa.Float()),
        sa.Column("eval_loss", sa.Float()),
        sa.Column("learning_rate", sa.Float()),
        sa.Column("tokens", sa.BigInteger()),
        sa.Column("checkpoint_number", sa.Integer()),
        sa.UniqueConstraint("job_id", "step"),
    )
    _job_child(
        "job_checkpoints",
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(512), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.UniqueConstraint("job_id", "step"),
    )


def downgrade() -> None:
    for table in ("job_checkpoints", "job_metrics", "job_events", "finetuning_jobs"):
        op.drop_table(table)
