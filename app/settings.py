"""The one Settings object: every knob of the control plane and workers, read from TUNEFORGE_* env vars."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A secret that is fine on a laptop and refused in production (see `_refuse_dev_secrets`).
DEVELOPMENT_SECRET_KEY = "tuneforge-development-secret-change-me"


class Settings(BaseSettings):
    """Read once at an entry point (app factory, CLI, Celery app) and passed down as an object."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".tuneforge")
    # Empty means "derive from data_dir": SQLite file / local blob directory / embedded broker.
    database_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Host in the presigned URLs handed to clients, when they reach S3 at another address than we do.
    s3_public_endpoint_url: str | None = None
    broker_url: str = ""
    # Signs upload tokens and the control plane's own short-lived blob URLs.
    secret_key: str = DEVELOPMENT_SECRET_KEY
    # Where clients reach this control plane; used to build signed URLs for the local blob store.
    # Empty means "the base URL of the request that asked for the link".
    public_url: str = ""
    max_upload_bytes: int = Field(default=1024**3, gt=0)
    signed_url_ttl_seconds: int = Field(default=3600, gt=0)
    # Objects larger than this go to S3 in parts of this size.
    multipart_chunk_bytes: int = Field(default=16 * 1024**2, ge=5 * 1024**2)
    dataset_preview_rows: int = Field(default=5, ge=0, le=100)
    # Fine-tuning jobs: the Celery queue the API enqueues to and workers consume.
    train_queue: str = "tuneforge.train"
    # A hard ceiling on one delivery of a job, so a hung run cannot hold a GPU forever.
    job_time_limit_seconds: int = Field(default=24 * 3600, gt=0)
    # A worker refreshes its job's heartbeat every third of this; a job whose heartbeat is older is
    # taken to be orphaned (worker killed, node lost) and is re-enqueued to resume from its checkpoint.
    job_lease_seconds: float = Field(default=60.0, gt=0)
    # How often the control plane sweeps for jobs to (re-)enqueue (broker was down, worker lost).
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    # Threads the metrics streams (WebSocket and SSE) poll the database on, all watchers together:
    # one indexed read each per poll, so a few serve many watchers; they are not the request
    # handlers' threads, so slow routes cannot stall a stream and many watchers cannot stall routes.
    metrics_stream_threads: int = Field(default=8, ge=1, le=64)
    # Where workers keep built base-model checkpoints; empty means `<data_dir>/models`. Point several
    # workers (or test runs) at one shared directory to build each model once.
    model_cache_dir: Path | None = None
    # Base models beyond the built-in ones that workers can load (HF ids in their cache, local paths).
    extra_base_models: list[str] = Field(default_factory=list)
    # Serving: base model -> URL of an already-running `tuneforge serve` (a serving Deployment in
    # production), as JSON in TUNEFORGE_SERVING_URLS. A base model not named here gets a serving
    # process of its own, started by the control plane on first use.
    serving_urls: dict[str, str] = Field(default_factory=dict)
    # How long a request waits for a starting serving process before it is answered 503.
    serving_start_timeout_seconds: float = Field(default=120.0, gt=0)
    # The embedded default creates this tenant (and a token for it) on `tuneforge up`.
    dev_tenant: str = "dev"

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().absolute()
        self.data_dir = data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'tuneforge.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{data_dir / 'blobs'}"
        if self.model_cache_dir is None:
            self.model_cache_dir = data_dir / "models"
        if not self.broker_url:
            # kombu's SQLAlchemy transport: a real Celery broker that needs no server.
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        scheme = urlparse(self.storage_url).scheme
        if scheme not in ("file", "s3"):
            raise ValueError(
                f"storage_url: unsupported scheme {scheme!r}; use file:///path or s3://bucket/prefix"
            )
        if self.environment == "production":
            self._refuse_dev_secrets()
        return self

    def _refuse_dev_secrets(self) -> None:
        if self.secret_key == DEVELOPMENT_SECRET_KEY or len(self.secret_key) < 32:
            raise ValueError(
                "secret_key: production refuses the development secret; set TUNEFORGE_SECRET_KEY "
                "to at least 32 random characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))'`)"
            )
        if self.database_url.startswith("sqlite"):
            raise ValueError(
                "database_url: production needs PostgreSQL; set TUNEFORGE_DATABASE_URL="
                "postgresql+psycopg://user:pass@host/db"
            )

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def dev_token_file(self) -> Path:
        """The embedded default's token, kept readable by its owner only; the DB stores only a hash."""
        return self.data_dir / "dev-token"
