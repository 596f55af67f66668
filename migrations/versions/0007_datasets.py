"""Datasets: when a dataset was last handed to the validate queue, for the sweeper's re-sends.

Revision ID: 0007_datasets
Revises: 0006_hardening
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_datasets"
down_revision: str | None = "0006_hardening"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("validation_enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("validation_enqueued_at")
