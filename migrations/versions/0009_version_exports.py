"""Version exports: the state of a version's merged (standard Hugging Face) model export.

Revision ID: 0009_version_exports
Revises: 0008_model_store
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_version_exports"
down_revision: str | None = "0008_model_store"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("export_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("export_prefix", sa.String(512), nullable=True))
        batch.add_column(sa.Column("export_files", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("export_error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("export_updated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        for column in ("export_updated_at", "export_error", "export_files", "export_prefix", "export_status"):
            batch.drop_column(column)
