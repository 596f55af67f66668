"""Hardening: token expiry, a cap on dataset validation attempts, one dataset per uploaded blob.

Revision ID: 0006_hardening
Revises: 0005_deployments
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_hardening"
down_revision: str | None = "0005_deployments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("validation_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.create_unique_constraint("uq_datasets_blob_key", ["blob_key"])


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint("uq_datasets_blob_key", type_="unique")
        batch.drop_column("validation_attempts")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
