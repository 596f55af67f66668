"""Fine-tuning jobs: an optional evaluation dataset (OpenAI's `validation_file`), whose rows are the run's
held-out split, and the caller's labels (OpenAI's `metadata`).

Revision ID: 0012_job_eval_dataset
Revises: 0011_job_task_metrics
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_job_eval_dataset"
down_revision: str | None = "0011_job_task_metrics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_finetuning_jobs_eval_dataset_id_datasets"


def upgrade() -> None:
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.add_column(sa.Column("eval_dataset_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("eval_dataset_name", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch.create_foreign_key(FOREIGN_KEY, "datasets", ["eval_dataset_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        batch.drop_column("labels")
        batch.drop_column("eval_dataset_name")
        batch.drop_column("eval_dataset_id")
