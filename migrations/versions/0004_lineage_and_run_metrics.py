"""Version lineage (continued from a checkpoint step), the worker's automatic decisions and quality
report on each version; gradient, evaluation, throughput and memory metrics per step.

Revision ID: 0004_lineage_and_run_metrics
Revises: 0003_job_leases
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_lineage_and_run_metrics"
down_revision: str | None = "0003_job_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, type) of the nullable per-step metrics added to job_metrics.
METRIC_COLUMNS: tuple[tuple[str, type[sa.types.TypeEngine]], ...] = (
    ("grad_norm", sa.Float),
    ("eval_perplexity", sa.Float),
    ("tokens_per_second", sa.Float),
    ("useful_tokens", sa.BigInteger),
    ("peak_rss_bytes", sa.BigInteger),
    ("cuda_allocated_bytes", sa.BigInteger),
    ("gpu_utilization", sa.Float),
)


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("parent_checkpoint_step", sa.Integer()))
        # Existing versions get {}: nothing was decided automatically or measured for them.
        batch.add_column(sa.Column("autoconfig", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("quality_report", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("job_metrics") as batch:
        for name, kind in METRIC_COLUMNS:
            batch.add_column(sa.Column(name, kind()))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name, _ in reversed(METRIC_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("quality_report")
        batch.drop_column("autoconfig")
        batch.drop_column("parent_checkpoint_step")
