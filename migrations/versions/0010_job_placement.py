"""Jobs: the worker class a job was placed on and the memory estimate behind it.

Revision ID: 0010_job_placement
Revises: 0009_version_exports
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_job_placement"
down_revision: str | None = "0009_version_exports"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.add_column(sa.Column("worker_class", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("placement", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("finetuning_jobs") as batch:
        batch.drop_column("placement")
        batch.drop_column("worker_class")
