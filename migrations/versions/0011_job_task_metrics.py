"""Job metrics: the task's own metrics per step (rewards, accuracies, KL) as one JSON object.

Revision ID: 0011_job_task_metrics
Revises: 0010_job_placement
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_job_task_metrics"
down_revision: str | None = "0010_job_placement"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        batch.add_column(sa.Column("task_metrics", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        batch.drop_column("task_metrics")
