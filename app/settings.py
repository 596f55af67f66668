"""The one Settings object: every knob of the control plane and workers, read from TUNEFORGE_* env vars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tuneforge.client import DEFAULT_DATA_DIR, DEV_TOKEN_FILE
from tuneforge.lora_rules import DEFAULT_MAX_LORA_RANK

# A secret that is fine on a laptop and refused everywhere else (see `_refuse_dev_secrets`).
DEVELOPMENT_SECRET_KEY = "tuneforge-development-secret-change-me"
# The most any deployment may allow for `max_lora_rank` (serving memory grows with it).
MAX_LORA_RANK_LIMIT = 4096
# Worker classes a cluster may name; far more GPU kinds x memory sizes than any cluster has.
MAX_WORKER_CLASSES = 32


class WorkerClass(BaseModel):
    """A kind of training worker: its device and memory per device. Its workers consume
    `<train_queue>.<name>`; the control plane sends each job to the smallest class it fits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Part of a queue name and of the job's API response: short, lower-case, no dots.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    device: Literal["cuda", "cpu"] = "cuda"
    # Memory one training process may use on one device (a GPU's, or the host's for "cpu").
    memory_gib: float = Field(gt=0, le=16_384)
    device_count: int = Field(default=1, ge=1, le=64)


class Settings(BaseSettings):
    """Read once at an entry point (app factory, CLI, Celery app) and passed down as an object."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(DEFAULT_DATA_DIR)
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
    # --- dataset validation: Celery workers (`tuneforge worker`), never the API process ---------
    # The queue the API sends `tuneforge.validate` to; a validate worker node consumes only it, so a
    # validation never waits behind a training job.
    validate_queue: str = Field(default="tuneforge.validate", min_length=1, max_length=200)
    # A validation still running after this long is stopped and its dataset ends `errored`; streaming
    # validation of a file at the default 1 GiB upload limit takes about a minute.
    validation_time_limit_seconds: int = Field(default=600, ge=5, le=6 * 3600)
    # Memory one validation may allocate on top of what its worker process holds at start (an address
    # space limit, RLIMIT_AS): rows are checked one at a time, so only a hostile file (a decompression
    # bomb) needs more, and it then ends `errored` instead of taking the worker down.
    validation_memory_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024**2, le=256 * 1024**3)
    # Validation runs that ended without a verdict (worker lost or killed, storage unreachable) before
    # the dataset ends `errored` rather than being sent again.
    validation_max_attempts: int = Field(default=3, ge=1, le=20)
    # Datasets one validate worker node checks at once, each in a process of its own.
    validation_concurrency: int = Field(default=2, ge=1, le=64)
    # --- bytes streamed through the control plane (local blob store, uploads relayed to S3) -------
    # Transfers one API process streams at once; more are answered 503 + Retry-After, so slow clients
    # cannot pile up open files and buffers. They never hold a thread of the pool ordinary routes use.
    blob_transfer_limit: int = Field(default=64, ge=1, le=4096)
    # A transfer whose client sends (PUT) or takes (GET) nothing for this long is dropped.
    blob_idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Fine-tuning jobs: the Celery queue the API enqueues to and workers consume.
    train_queue: str = "tuneforge.train"
    # --- placement by memory (app/services/placement.py) -------------------------------------------
    # The cluster's training worker classes, as JSON in TUNEFORGE_WORKER_CLASSES, e.g.
    # [{"name": "a100-80", "device": "cuda", "memory_gib": 80, "device_count": 1}]. Each job goes to
    # `<train_queue>.<name>` of the smallest class its memory estimate fits; empty (the embedded
    # default): every job goes to `train_queue`, and its estimate is still recorded.
    worker_classes: list[WorkerClass] = Field(default_factory=list, max_length=MAX_WORKER_CLASSES)
    # A training worker's own class (TUNEFORGE_WORKER_CLASS, or `tuneforge worker --worker-class`): it
    # consumes `<train_queue>.<worker_class>`, plus `train_queue` (jobs nothing could estimate) when no
    # class is larger; unset, it consumes `train_queue` alone.
    worker_class: str | None = Field(default=None, min_length=1, max_length=40)

    @field_validator("worker_class", mode="before")
    @classmethod
    def _empty_worker_class_is_none(cls, value: object) -> object:
        # `TUNEFORGE_WORKER_CLASS=` (compose's `${TUNEFORGE_WORKER_CLASS:-}`) means no class.
        return None if value == "" else value

    @model_validator(mode="after")
    def _known_worker_classes(self) -> Settings:
        names = [spec.name for spec in self.worker_classes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"worker_classes: the name {duplicates[0]!r} is given twice; names must be unique"
            )
        if self.worker_class is not None and self.worker_class not in names:
            known = ", ".join(names) or "none are configured"
            raise ValueError(
                f"worker_class: {self.worker_class!r} is not one of worker_classes ({known}); name one "
                "of them, or set TUNEFORGE_WORKER_CLASSES to the same list the control plane has"
            )
        return self

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
    # Local model directories (absolute paths) beyond the built-ins and the model store that workers
    # and serving processes can load as they are.
    extra_base_models: list[str] = Field(default_factory=list)
    # A Hugging Face hub cache (`HF_HUB_CACHE`, `HF_HOME/hub`) that workers read models from directly,
    # by repo id; empty means the one those variables name, if they are set (never the user's default
    # cache by accident: a service should not depend on whoever last ran `huggingface-cli`).
    hf_hub_cache: Path | None = None
    # Models (HF repo ids or imported names) whose own Python code (`auto_map` in config.json) may run
    # on workers and serving processes; every other model loads with trust_remote_code off.
    trust_remote_code_models: list[str] = Field(default_factory=list, max_length=1000)
    # Serving: serving key (a base model, `vllm:<base model>` for vLLM) -> URLs of its already-running
    # replicas (`tuneforge serve`, a serving Deployment in production), as JSON in
    # TUNEFORGE_SERVING_URLS; a single URL may be given as a string. A key not named here gets serving
    # processes of its own, started by the control plane on first use.
    serving_urls: dict[str, list[str]] = Field(default_factory=dict, max_length=1000)
    # The engine a deployment that names none is served by (`config.engine`; tuneforge.rules.served_models).
    serving_engine: Literal["tuneforge", "vllm"] = "tuneforge"
    # The most serving replicas of one serving key this control plane runs itself (a deployment's
    # maxReplicas past it is refused); each replica is a whole engine with its own copy of the weights.
    serving_max_replicas: int = Field(default=4, ge=1, le=64)
    # The KV-cache budget in bytes of each tuneforge-engine serving process this control plane starts
    # (`tuneforge serve --kv-cache-bytes`); unset, the engine's default (1 GiB). It must hold one
    # sequence of the model's whole context: a serving process refuses to start otherwise, naming it.
    serving_kv_cache_bytes: int | None = Field(default=None, ge=1 << 20, le=1 << 42)
    # vLLM as a serving engine: the Python interpreter of an environment where vLLM is installed
    # (`make vllm` makes `.venv-vllm`, since vLLM pins its own torch). Unset: the control plane runs no
    # vLLM process itself and accepts `engine: "vllm"` only where TUNEFORGE_SERVING_URLS names one.
    vllm_python: Path | None = None
    # vLLM's knobs, one set per serving process (which every tenant's deployments of the model share,
    # so they are the operator's, not a deployment's): adapters resident on the device and in host
    # memory, the largest LoRA rank it accepts, GPUs per replica, dtype, prefix caching, the share of
    # GPU memory it takes, its context length (empty: the model's), and on the CPU its KV cache size.
    vllm_max_loras: int = Field(default=8, ge=1, le=1024)
    vllm_max_cpu_loras: int | None = Field(default=None, ge=1, le=65_536)
    vllm_max_lora_rank: int = Field(default=64, ge=1, le=512)
    vllm_tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    vllm_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    vllm_enable_prefix_caching: bool = True
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    vllm_max_model_len: int | None = Field(default=None, ge=16, le=10_000_000)
    vllm_cpu_kv_cache_gib: float = Field(default=1.0, gt=0, le=4096)
    # How long a request waits for a starting serving process before it is answered 503.
    serving_start_timeout_seconds: float = Field(default=120.0, gt=0)
    # The largest LoRA rank an uploaded adapter may have (tuneforge.lora_rules' default: 512, far above
    # what anyone trains); higher ranks cost every tenant of the serving process memory and time.
    max_lora_rank: int = Field(default=DEFAULT_MAX_LORA_RANK, ge=1, le=MAX_LORA_RANK_LIMIT)
    # Serving on the CPU: steps of a few rows run a small-GEMM kernel compiled once per machine
    # (TUNEFORGE_CPU_KERNELS=false falls back to torch); its build cache, empty for the user cache dir.
    cpu_kernels: bool = True
    kernel_cache: Path | None = None
    # A serving process this control plane runs that stops answering /health for this long (wedged:
    # a stuck step, a stopped process) is stopped and restarted by the next request. Long enough that
    # a busy engine on a small CPU is never taken for a wedged one.
    serving_unresponsive_seconds: float = Field(default=15.0, ge=1, le=600)
    # How long a stopping serving process gets after SIGTERM before it is killed (SIGKILL).
    serving_stop_timeout_seconds: float = Field(default=10.0, ge=1, le=120)
    # The embedded default creates this tenant (and a token for it) on `tuneforge up`.
    dev_tenant: str = "dev"

    # --- fairness: per-tenant limits (429 + Retry-After), lost work, outages, garbage collection ---
    # Queued + training + stopping jobs one tenant may have: beyond it a new job is refused rather
    # than queued, so one tenant cannot fill every GPU's queue for hours.
    tenant_max_active_jobs: int = Field(default=8, ge=1, le=10_000)
    # Requests one tenant may have in flight through the serving proxy of one API process; a serving
    # process batches ~32 sequences, so a tenant past this would only be queueing ahead of others.
    tenant_max_waiting_requests: int = Field(default=64, ge=1, le=100_000)
    # Proxy requests per second per tenant (token bucket refilled at this rate, holding `burst`).
    tenant_requests_per_second: float = Field(default=50.0, gt=0, le=100_000)
    tenant_request_burst: int = Field(default=100, ge=1, le=1_000_000)
    # Bytes one tenant may keep stored: datasets + adapter versions + checkpoints (tokenised caches,
    # being derived, are not counted). Checked when an upload is registered and when a job is accepted.
    tenant_max_stored_bytes: int = Field(default=200 * 1024**3, ge=1, le=1024**5)
    # A job whose worker was lost this many times (OOM-killed, node lost) ends `errored` instead of
    # being redelivered forever; a crash that repeats at the same step would otherwise loop for good.
    job_max_attempts: int = Field(default=3, ge=1, le=100)
    # How long a worker keeps retrying a training job's database writes (metrics, checkpoints, final
    # status) through a database outage before it gives the job up to the sweeper; a PostgreSQL
    # restart or failover takes well under this.
    worker_db_retry_seconds: float = Field(default=300.0, ge=0, le=24 * 3600)
    # Devices (GPUs) of this worker one job may train on, one process each; a job's num_devices is
    # capped at it. Unset: every CUDA device the worker sees (1 without CUDA, where more processes
    # only share the same cores; set it to run the multi-device path on CPU, over gloo).
    worker_devices: int | None = Field(default=None, ge=1, le=16)
    # A multi-device job's ranks fail (and the job resumes from its last checkpoint) when one of them
    # stops answering a collective for this long; rank 0's quality-report generation must fit in it.
    worker_collective_timeout_seconds: float = Field(default=600.0, ge=10, le=24 * 3600)
    # GRPO's reward functions (tenant code) run in a bubblewrap sandbox per function with these limits: a
    # call past the wall-clock timeout, the CPU time or the address space scores 0 and counts as failed.
    reward_call_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    reward_cpu_seconds: int = Field(default=10, ge=1, le=3600)
    reward_memory_bytes: int = Field(default=512 * 2**20, ge=64 * 2**20, le=64 * 2**30)
    # GRPO samples its rollouts with tuneforge's serving engine inside the training worker; its KV cache.
    worker_rollout_kv_cache_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 42)
    # A connection attempt to the database gives up after this, so requests answer 503 during an
    # outage instead of hanging on a dead host.
    database_connect_timeout_seconds: int = Field(default=5, ge=1, le=300)
    # `tuneforge gc` removes unreferenced blobs only once they are this old: a blob is written before
    # the row that points at it (an upload awaiting registration, a checkpoint being recorded).
    gc_min_age_seconds: float = Field(default=24 * 3600, ge=0, le=365 * 24 * 3600)

    @field_validator("serving_urls", mode="before")
    @classmethod
    def _one_url_or_a_list(cls, value: object) -> object:
        """`{"model": "http://a"}` as well as `{"model": ["http://a", "http://b"]}`."""
        if isinstance(value, dict):
            return {key: [urls] if isinstance(urls, str) else urls for key, urls in value.items()}
        return value

    @field_validator("serving_urls")
    @classmethod
    def _some_replicas(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, urls in value.items():
            if not urls or len(urls) > 256:
                raise ValueError(f"serving_urls[{key!r}]: one to 256 replica URLs (got {len(urls)})")
        return value

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
        if self.hf_hub_cache is None:
            self.hf_hub_cache = _hf_hub_cache_from_environment()
        if not self.broker_url:
            # kombu's SQLAlchemy transport: a real Celery broker that needs no server.
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        scheme = urlparse(self.storage_url).scheme
        if scheme not in ("file", "s3"):
            raise ValueError(
                f"storage_url: unsupported scheme {scheme!r}; use file:///path or s3://bucket/prefix"
            )
        # The secret signs upload tokens, blob URLs and serving assertions: a shared database or blob
        # store means other machines and people, to whom the published development secret is no secret.
        if self.environment == "production" or not self.is_embedded or scheme != "file":
            self._refuse_dev_secrets()
        return self

    def _refuse_dev_secrets(self) -> None:
        if self.secret_key == DEVELOPMENT_SECRET_KEY or len(self.secret_key) < 32:
            where = (
                "production" if self.environment == "production" else "a configuration with PostgreSQL or S3"
            )
            raise ValueError(
                f"secret_key: {where} refuses the development secret (only the embedded SQLite + local "
                "directory default accepts it); set TUNEFORGE_SECRET_KEY to at least 32 random characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if self.environment == "production" and self.database_url.startswith("sqlite"):
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
        return self.data_dir / DEV_TOKEN_FILE


def _hf_hub_cache_from_environment() -> Path | None:
    """The HF hub cache that `HF_HUB_CACHE` or `HF_HOME` names, as huggingface_hub reads them."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None
