"""Job leases (heartbeat) so a lost worker's job is re-enqueued; the dataset name kept on the job;
which attempt wrote each metrics row.

Revision ID: 0003_job_leases
Revises: 0002_jobs
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_job_leases"
down_revision: str | None = "0002_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("dataset_name", sa.String(255), nullable=False, server_default=""))
    with op.batch_alter_table("job_metrics") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.drop_column("dataset_name")
        batch.drop_column("heartbeat_at")
