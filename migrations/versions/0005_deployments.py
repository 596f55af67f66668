"""Deployments: a tenant's named handle on a base model that a serving process serves.

Revision ID: 0005_deployments
Revises: 0004_lineage_and_run_metrics
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_deployments"
down_revision: str | None = "0004_lineage_and_run_metrics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_deployments_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_deployments_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint("uuid", name=op.f("uq_deployments_uuid")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_deployments_tenant_id")),
    )
    op.create_index(op.f("ix_deployments_tenant_id"), "deployments", ["tenant_id"])
    op.create_index(op.f("ix_deployments_base_model"), "deployments", ["base_model"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deployments_base_model"), table_name="deployments")
    op.drop_index(op.f("ix_deployments_tenant_id"), table_name="deployments")
    op.drop_table("deployments")
