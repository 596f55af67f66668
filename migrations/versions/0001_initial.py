"""Tenants, users, API tokens, datasets, repos and adapter versions.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _common() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _fk(column: str, target: str, ondelete: str, nullable: bool = False) -> sa.Column:
    return sa.Column(column, sa.Integer(), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tenants",
        *_common(),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("short_code", sa.String(16), nullable=False, unique=True),
    )
    op.create_table(
        "users",
        *_common(),
        _fk("tenant_id", "tenants.id", "CASCADE"),
        sa.Column("username", sa.String(64), nullable=False),
        sa.UniqueConstraint("tenant_id", "username"),
    )
    op.create_index("ix_users_tenant_id", "users", ["tenant_id"])
    op.create_table(
        "api_tokens",
        *_common(),
        _fk("user_id", "users.id", "CASCADE"),
        sa.Column("lookup_id", sa.String(32), nullable=False, unique=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "datasets",
        *_common(),
        _fk("tenant_id", "tenants.id", "CASCADE"),
        _fk("created_by_id", "users.id", "SET NULL", nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("connection_name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("mime_type", sa.String(128), nullable=False),
        sa.Column("blob_key", sa.String(512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("sha256", sa.String(64)),
        sa.Column("format", sa.String(32)),
        sa.Column("row_count", sa.BigInteger()),
        sa.Column("columns", sa.JSON()),
        sa.Column("split_counts", sa.JSON()),
        sa.Column("preview", sa.JSON()),
        sa.Column("last_error", sa.Text()),
        sa.UniqueConstraint("tenant_id", "connection_name", "name"),
    )
    op.create_index("ix_datasets_tenant_id", "datasets", ["tenant_id"])
    op.create_table(
        "repos",
        *_common(),
        _fk("tenant_id", "tenants.id", "CASCADE"),
        _fk("created_by_id", "users.id", "SET NULL", nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("last_tag", sa.Integer(), nullable=False),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_index("ix_repos_tenant_id", "repos", ["tenant_id"])
    op.create_table(
        "adapter_versions",
        *_common(),
        _fk("repo_id", "repos.id", "CASCADE"),
        _fk("created_by_id", "users.id", "SET NULL", nullable=True),
        sa.Column("tag", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("adapter_type", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        _fk("parent_version_id", "adapter_versions.id", "SET NULL", nullable=True),
        sa.Column("artifact_prefix", sa.String(512)),
        sa.Column("artifact_files", sa.JSON(), nullable=False),
        sa.Column("metrics_summary", sa.JSON(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.UniqueConstraint("repo_id", "tag"),
    )
    op.create_index("ix_adapter_versions_repo_id", "adapter_versions", ["repo_id"])


def downgrade() -> None:
    for table in ("adapter_versions", "repos", "datasets", "api_tokens", "users", "tenants"):
        op.drop_table(table)
