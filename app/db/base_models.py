"""The model store's catalogue: one row per base model whose weights were pulled or imported into blobs.

The blobs and their manifest (`tuneforge.rules.base_models.ModelManifest`) are what workers read;
the row is what the control plane lists and checks a job's or deployment's base model against.
The manifest is written before the row, so a row always names a complete model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class StoredModel(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    # `ModelName.canonical`: `org/name[@revision]` for a hub model, the imported name otherwise.
    name: Mapped[str] = mapped_column(String(256), unique=True)
    source: Mapped[str] = mapped_column(String(16))  # "hub" | "import"
    repo_id: Mapped[str | None] = mapped_column(String(256))
    revision: Mapped[str | None] = mapped_column(String(100))  # the commit pulled, for a hub model
    model_type: Mapped[str | None] = mapped_column(String(64))  # config.json's, e.g. "llama"
    parameter_count: Mapped[int] = mapped_column(BigInteger)  # tensor elements in the safetensors files
    context_length: Mapped[int | None] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
