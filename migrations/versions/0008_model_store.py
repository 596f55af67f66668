"""The model store: base models pulled from a hub or imported from a directory into the blob store.

Revision ID: 0008_model_store
Revises: 0007_datasets
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_model_store"
down_revision: str | None = "0007_datasets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("repo_id", sa.String(256), nullable=True),
        sa.Column("revision", sa.String(100), nullable=True),
        sa.Column("model_type", sa.String(64), nullable=True),
        sa.Column("parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=True),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )


def downgrade() -> None:
    op.drop_table("base_models")
