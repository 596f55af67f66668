"""Settings: derived embedded defaults, env prefix, and production's refusal of development secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import DEVELOPMENT_SECRET_KEY, Settings

STRONG = "x" * 48


def test_embedded_defaults_derive_from_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'tuneforge.db'}"
    assert settings.storage_url == f"file://{tmp_path / 'blobs'}"
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert settings.is_embedded


def test_reads_tuneforge_prefixed_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_MAX_UPLOAD_BYTES", "1234")
    settings = Settings()
    assert settings.data_dir == tmp_path and settings.max_upload_bytes == 1234


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(
            environment="production",
            secret_key=DEVELOPMENT_SECRET_KEY,
            database_url="postgresql+psycopg://h/d",
        )


def test_production_refuses_a_short_secret() -> None:
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(environment="production", secret_key="short", database_url="postgresql+psycopg://h/d")


def test_production_refuses_sqlite() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        Settings(environment="production", secret_key=STRONG)


def test_production_accepts_real_secrets() -> None:
    settings = Settings(
        environment="production",
        secret_key=STRONG,
        database_url="postgresql+psycopg://h/d",
        storage_url="s3://bucket/prefix",
    )
    assert not settings.is_embedded


def test_unknown_storage_scheme_names_the_field() -> None:
    with pytest.raises(ValidationError, match="storage_url"):
        Settings(storage_url="ftp://somewhere")


@pytest.mark.parametrize(
    "shared",
    [
        {"database_url": "postgresql+psycopg://h/d"},
        {"storage_url": "s3://bucket/prefix"},
        {"database_url": "postgresql+psycopg://h/d", "storage_url": "s3://bucket/prefix"},
    ],
    ids=["postgres", "s3", "postgres+s3"],
)
def test_any_shared_database_or_blob_store_refuses_the_development_secret(
    shared: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="secret_key: a configuration with PostgreSQL or S3"):
        Settings(data_dir=tmp_path, **shared)
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(data_dir=tmp_path, secret_key="short", **shared)
    assert Settings(data_dir=tmp_path, secret_key=STRONG, **shared).secret_key == STRONG


def test_only_the_embedded_default_accepts_the_development_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.secret_key == DEVELOPMENT_SECRET_KEY and settings.is_embedded
