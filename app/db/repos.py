"""Adapter repository aggregate: a named repo and its numbered, immutable adapter versions."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, Timestamped


class VersionStatus(enum.StrEnum):
    """Follows the fine-tuning job that produces the version; uploaded adapters start `completed`."""

    QUEUED = "queued"
    TRAINING = "training"
    STOPPING = "stopping"
    COMPLETED = "completed"
    ERRORED = "errored"
    CANCELED = "canceled"


class ExportStatus(enum.StrEnum):
    """A version's merged-model export: none yet (NULL) → `queued` → `running` → `completed` | `errored`;
    an errored export may be asked for again. A whole-model version (full / last_layer) is `completed`
    at once: its artifact already is the model."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    ERRORED = "errored"


class VersionSource(enum.StrEnum):
    UPLOAD = "upload"
    FINETUNE = "finetune"


class Repo(Timestamped, Base):
    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    # Highest tag ever handed out; incremented atomically so tags are never reused, even after deletes.
    last_tag: Mapped[int] = mapped_column(Integer, default=0)

    # Versions go with their repo. Without the delete cascade the ORM would null the repo_id of
    # versions already loaded instead of letting them go (passive_deletes alone does not stop that).
    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="repo",
        order_by="AdapterVersion.tag",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class AdapterVersion(Timestamped, Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("repo_id", "tag"),)

    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    tag: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.QUEUED)
    source: Mapped[str] = mapped_column(String(16), default=VersionSource.FINETUNE)
    adapter_type: Mapped[str] = mapped_column(String(32), default="lora")
    base_model: Mapped[str] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The version a fine-tuning job continued from (`continueFromVersion`); with
    # `parent_checkpoint_step` it started from that step's checkpoint of the parent's job instead of
    # the parent's published artifact. The step is kept even if the parent is deleted later, to say
    # what the lineage was.
    parent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    parent_checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    # Storage prefix of the artifact and, per file, its size and sha256 (verified on read).
    artifact_prefix: Mapped[str | None] = mapped_column(String(512))
    artifact_files: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON, default=dict)
    metrics_summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What the worker decided on its own (automatic layer selection and per-module ranks), and how
    # the adapter compares with its base (exact match, eval loss / perplexity); {} when not measured.
    autoconfig: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    quality_report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    # The merged model export (`ExportStatus`): where its files lie (under the artifact's own directory,
    # or the artifact itself for a whole model), each file's size and sha256, and why it failed.
    export_status: Mapped[str | None] = mapped_column(String(16))
    export_prefix: Mapped[str | None] = mapped_column(String(512))
    export_files: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON, default=dict, server_default="{}")
    export_error: Mapped[str | None] = mapped_column(Text)
    export_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    description: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    repo: Mapped[Repo] = relationship(back_populates="versions", lazy="joined")
    created_by = relationship("User", lazy="joined")
    parent: Mapped[AdapterVersion | None] = relationship(
        remote_side="AdapterVersion.id", foreign_keys=[parent_version_id], lazy="select"
    )
    # The job that trains this version (none for an uploaded adapter); the job row owns the link.
    job = relationship(
        "FinetuningJob",
        primaryjoin="FinetuningJob.version_id == AdapterVersion.id",
        uselist=False,
        viewonly=True,
        lazy="select",
    )
