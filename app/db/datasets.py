"""Dataset aggregate: an uploaded file, where its bytes live, and what validation found in it."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, Timestamped


class DatasetStatus(enum.StrEnum):
    """`validating` → `connected` | `errored`. The SDK polls until `connected` or a `lastError`.

    Validation runs on a worker (`tuneforge.validate`); a dataset whose validation ends without a
    verdict `validation_max_attempts` times ends `errored` instead of being sent again.
    """

    VALIDATING = "validating"
    CONNECTED = "connected"
    ERRORED = "errored"


class Dataset(Timestamped, Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "connection_name", "name"),)

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(64))
    # Predibase groups uploads under the `file_uploads` connection; kept for wire compatibility.
    connection_name: Mapped[str] = mapped_column(String(64), default="file_uploads")
    status: Mapped[str] = mapped_column(String(16), default=DatasetStatus.VALIDATING)
    file_name: Mapped[str] = mapped_column(String(255))
    mime_type: Mapped[str] = mapped_column(String(128), default="application/octet-stream")
    # Unique: one upload registers at most one dataset.
    blob_key: Mapped[str] = mapped_column(String(512), unique=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # What validation found: a tuneforge.rules.datasets.DatasetKind (prompt_completion, messages, text,
    # preference, classification, prompt), and its evidence.
    format: Mapped[str | None] = mapped_column(String(32))
    row_count: Mapped[int | None] = mapped_column(BigInteger)
    columns: Mapped[list[str] | None] = mapped_column(JSON)
    split_counts: Mapped[dict[str, int] | None] = mapped_column(JSON)
    preview: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Validation runs that ended without a verdict (worker lost, timed out); capped, then `errored`.
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the API or the sweeper last handed the dataset to the validate queue; None: never (the
    # broker was down), so the sweeper sends it.
    validation_enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
