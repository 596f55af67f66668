"""Deployment aggregate: a tenant's named handle on a base model served by a serving process.

A deployment owns no process: every deployment of one base model shares the serving process the
control plane supervises (or the serving Deployment an operator runs), so its live status comes from
`app.supervision.serving_processes`, not from this row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, Timestamped


class Deployment(Timestamped, Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    # Indexed: deleting a deployment asks whether any other one still needs this base model.
    base_model: Mapped[str] = mapped_column(String(255), index=True)
    # The Predibase DeploymentConfig as sent (camelCase keys), baseModel included.
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
