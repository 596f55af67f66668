"""`tuneforge serve`: one base model's serving process, with adapters resolved through tuneforge storage.

The launcher is the serving engine's I/O glue (as `worker/tasks.py` is the trainer's): it reads
settings, finds adapter versions and checkpoints in the control plane's database, downloads their
PEFT files from the blob store, and hands the engine an `AdapterSource` that knows nothing of either.
An id is resolved to its version's uuid on every request (the engine remembers it for a couple of
seconds), so a deleted, archived or replaced version stops being served within that time.

A process started for `version:<uuid>` (a deployment whose model is an adapter version) serves that
version as its model instead: merged into its base (`worker.training.merge`) into a directory cached by
the version's uuid (versions are immutable), and no per-request adapters besides.

The engine is tuneforge's, or vLLM (`--engine vllm`, or a key `vllm:<model>`): a vLLM child process run
with vLLM's own interpreter behind the same HTTP app, with adapters from the same source.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge.lora_rules import DEFAULT_MAX_LORA_RANK
from tuneforge.rules import base_models as base_model_rules
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS, ArtifactManifest
from tuneforge.rules.served_models import VLLM_ENGINE, engine_of, model_key_of, version_uuid_of

from app.context import AppContext
from app.db import AdapterVersion, VersionStatus
from app.errors import ServiceError
from app.services import exports, versions
from app.settings import Settings
from app.storage import open_blob_store
from app.storage.base import BlobNotFoundError, StorageError
from worker.model_store import resolve_model_dir
from worker.serving.adapters import AdapterSource, ResolvedAdapter
from worker.serving.cpu_kernels import KernelConfig
from worker.serving.errors import AdapterLoadError, AdapterNotFoundError

if TYPE_CHECKING:
    from worker.serving.engine import EngineConfig
    from worker.serving.engine_api import ServingEngine
    from worker.serving.vllm_engine.process import VllmConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Artifact:
    """Where one servable adapter's files lie in the blob store, and the cache key they go under."""

    key: str
    prefix: str
    files: dict[str, dict[str, Any]]


class StorageAdapterSource:
    """Adapters `repo/N` (a completed version) and `repo/N@step` (a stored checkpoint) of a tenant.

    `resolve` finds what the id names now (its version's uuid is the key); `fetch` downloads exactly
    that version, whatever the name has come to mean since. Files land in
    `cache_dir/<version uuid>[/step-N]`, written to a scratch directory and renamed into place once
    every sha256 matched, so a crash never leaves a half-written adapter to be served.
    """

    def __init__(self, ctx: AppContext, cache_dir: Path, default_tenant: str, *, base_model: str) -> None:
        self._ctx, self._cache_dir, self._default_tenant = ctx, Path(cache_dir), default_tenant
        self._base_model = base_model
        self._lock = threading.Lock()  # one download per key at a time; loads are rare

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        with self._ctx.sessions() as session:
            artifact = self._artifact(session, adapter_id, tenant or self._default_tenant)
        return ResolvedAdapter(adapter_id, tenant, artifact.key, artifact)

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        artifact: _Artifact = adapter.location
        target = self._cache_dir / artifact.key
        with self._lock:
            if not target.is_dir():
                self._download(adapter.adapter_id, artifact, target)
        return target

    def list_available(self, tenant: str | None) -> list[str]:
        """Completed versions of the served base model with safetensors weights, as `repo/N`."""
        with self._ctx.sessions() as session:
            return versions.servable_ids(session, tenant or self._default_tenant, self._base_model)

    def _artifact(self, session: Session, adapter_id: str, tenant: str) -> _Artifact:
        try:
            ref = AdapterRef.parse(adapter_id.strip())
        except AdapterRefError:
            raise AdapterNotFoundError(
                f"adapter {adapter_id!r} not found: adapter ids are 'repo/N' or, for a checkpoint, "
                "'repo/N@step'"
            ) from None
        try:
            found = versions.resolve(session, tenant, ref)
        except versions.VersionNotFoundError:  # also another tenant's: its existence is not revealed
            raise AdapterNotFoundError(f"adapter {ref.version} not found", field="adapter_id") from None
        except versions.CheckpointNotFoundError as missing:
            self._check_servable(missing.version, ref)
            available = ", ".join(str(s) for s in missing.available) or "none"
            raise AdapterNotFoundError(
                f"adapter {ref} not found: stored checkpoint steps are {available}"
            ) from None
        version = found.version
        self._check_servable(version, ref)
        if found.checkpoint is not None:
            files = _adapter_files(str(ref), versions.model_files(found.checkpoint.files))
            return _Artifact(f"{version.uuid}/step-{ref.step}", found.checkpoint.prefix, files)
        if (
            version.status != VersionStatus.COMPLETED
            or not version.artifact_files
            or not version.artifact_prefix
        ):
            raise AdapterLoadError(
                f"adapter {adapter_id} is {version.status}, not completed, so it has no adapter to serve "
                "yet; wait for it, or serve one of its checkpoints ('repo/N@step')"
            )
        return _Artifact(
            version.uuid, version.artifact_prefix, _adapter_files(adapter_id, version.artifact_files)
        )

    def _check_servable(self, version: AdapterVersion, ref: AdapterRef) -> None:
        if version.archived:
            raise AdapterNotFoundError(
                f"adapter {ref.version} is archived; unarchive it to serve it", field="adapter_id"
            )
        if version.base_model not in base_model_rules.aliases(self._base_model):
            raise AdapterLoadError(
                f"adapter {ref} was trained on {version.base_model!r}; this deployment serves "
                f"{self._base_model!r}, so it cannot load it (deploy {version.base_model!r} to serve it)"
            )

    def _download(self, adapter_id: str, artifact: _Artifact, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            for name, meta in artifact.files.items():
                with (scratch / name).open("wb") as handle:
                    key = f"{artifact.prefix}{name}"
                    for chunk in self._ctx.store.iter_chunks(key, expected_sha256=meta.get("sha256")):
                        handle.write(chunk)
            scratch.rename(target)
        except BlobNotFoundError as exc:
            log.warning("adapter %s: a file is missing from storage: %s", adapter_id, exc)
            raise AdapterLoadError(f"adapter {adapter_id}: its files are missing from storage") from None
        except StorageError as exc:  # a checksum mismatch, or the store is unreachable
            log.warning("adapter %s: reading its files failed: %s", adapter_id, exc)
            raise AdapterLoadError(
                f"adapter {adapter_id}: cannot read its files (a checksum mismatch, or storage unreachable)"
            ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("adapter %s downloaded to %s", adapter_id, target)


def _adapter_files(adapter_id: str, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The files the engine loads (PEFT pair, plus Turbo heads when stored; a `turbo` trained on the base
    model alone has only the heads); never pickled weights."""
    manifest = ArtifactManifest.of_names(files)
    if not manifest.is_speculator_only:
        if not manifest.has_lora_weights:
            why = (
                f"only pickled weights ({PICKLED_WEIGHTS})"
                if manifest.has_pickled_weights
                else "no adapter weights"
            )
            raise AdapterLoadError(
                f"adapter {adapter_id} has {why}; serving loads only {ADAPTER_WEIGHTS} "
                "(upload it in safetensors)"
            )
        if not manifest.has_lora_config:
            raise AdapterLoadError(
                f"adapter {adapter_id} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter"
            )
    return {name: files[name] for name in manifest.servable()}


def kernel_config(settings: Settings, environ: Mapping[str, str]) -> KernelConfig:
    """The CPU small-step kernel's settings: on or off and its build cache from Settings, the C compiler
    to try first from the conventional CC."""
    return KernelConfig(
        enabled=settings.cpu_kernels, cache_dir=settings.kernel_cache, compiler=environ.get("CC") or None
    )


@dataclass(frozen=True)
class EngineOptions:
    """What `tuneforge serve` lets an operator choose about the engine (see its --help)."""

    max_adapters: int
    max_batch_size: int
    kv_cache_bytes: int | None
    speculation_max_batch: int | None = None
    speculation_depth: int | None = None
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    dtype: str = "fp32"
    device: str = "auto"
    engine: str = "tuneforge"  # or "vllm" (a `vllm:` key says so too)
    vllm: VllmOverrides | None = None
    enable_prefix_caching: bool = True  # the tuneforge engine's (vLLM's own is in VllmOverrides)
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class VllmOverrides:
    """`tuneforge serve` flags for vLLM; each None leaves the TUNEFORGE_VLLM_* setting in force."""

    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    tensor_parallel_size: int | None = None
    dtype: str | None = None  # vLLM's name (float32, bfloat16, ...)
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None


def run_server(
    settings: Settings,
    *,
    base_model: str,
    host: str,
    port: int,
    options: EngineOptions,
    preload: list[str],
    adapter_dir: Path | None,
    tenant: str | None,
    log_level: str = "info",
    parent_pid: int | None = None,
) -> int:
    """Load the model, start the engine, and serve HTTP until stopped; returns the exit code (non-zero
    when the engine died or the parent went away, so that a supervisor restarts it)."""
    from worker.serving.async_engine import AsyncEngine
    from worker.serving.lifetime import process_server
    from worker.serving.metrics import ServingMetrics
    from worker.serving.server import build_app
    from worker.serving.tenant_auth import SignedTenants

    tenant = tenant or settings.dev_tenant
    engine: ServingEngine
    vllm = engine_of(base_model) == VLLM_ENGINE or options.engine == VLLM_ENGINE
    if vllm:
        vllm_config, source, ctx = _served_by_vllm(
            settings, model_key_of(base_model), options, adapter_dir, tenant
        )
        from worker.serving.vllm_engine.engine import VllmEngine

        engine = VllmEngine(vllm_config, source)
    else:
        config, source, ctx = _served(settings, base_model, options, adapter_dir, tenant)
        engine = AsyncEngine(config, source=source, metrics=ServingMetrics())
    # Always verified: the tenant of a request is only ever the one the control plane signed.
    app = build_app(engine, tenants=SignedTenants.from_secret(settings.secret_key))
    server = process_server(app, engine, host=host, port=port, log_level=log_level, parent_pid=parent_pid)
    # uvicorn re-raises the SIGTERM it caught once it has stopped; exit through `finally` instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        engine.start()
        if preload:
            engine.preload(preload, tenant=tenant)
        note = " (engine vllm: Turbo adapters run without their speculators)" if vllm else ""
        print(f"tuneforge serving {base_model} on http://{host}:{port}{note}", flush=True)
        # uvicorn re-raises a Ctrl-C it has handled already; uvicorn.run swallows it, so do we.
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    finally:
        engine.shutdown()
        if ctx is not None:
            ctx.close()
    return server.exit_code


def _served(
    settings: Settings, base_model: str, options: EngineOptions, adapter_dir: Path | None, tenant: str
) -> tuple[EngineConfig, AdapterSource, AppContext | None]:
    """The engine's config and adapter source for `--base-model` (a base model, or `version:<uuid>`),
    with the context to close at exit."""
    (path, name), source, ctx = _served_model(settings, base_model, adapter_dir, tenant)
    return _engine_config(path, name, options, settings), source, ctx


def _served_by_vllm(
    settings: Settings, model_key: str, options: EngineOptions, adapter_dir: Path | None, tenant: str
) -> tuple[VllmConfig, AdapterSource, AppContext | None]:
    """vLLM's config and the adapter source for a base model or `version:<uuid>` (its merged directory is
    a model directory like any other), with the context to close at exit."""
    python = vllm_python(settings)
    (path, name), source, ctx = _served_model(settings, model_key, adapter_dir, tenant)
    return _vllm_config(python, path, name, options, settings), source, ctx


def _served_model(
    settings: Settings, model_key: str, adapter_dir: Path | None, tenant: str
) -> tuple[tuple[Path, str], AdapterSource, AppContext | None]:
    """The model directory and name for `model_key` (a base model, or `version:<uuid>` merged), the
    adapter source that goes with it, and the context to close at exit: what either engine serves."""
    version_uuid = version_uuid_of(model_key)
    if version_uuid is None:
        source, ctx = _adapter_source(settings, adapter_dir, tenant, model_key)
        return (_base_model_dir(settings, model_key), model_key), source, ctx
    ctx = AppContext.from_settings(settings)
    try:
        model = version_model(ctx, version_uuid, settings.data_dir / "serving" / "models")
    except BaseException:
        ctx.close()
        raise
    return (model.path, model.name), VersionModelSource(model), ctx


def vllm_python(settings: Settings) -> Path:
    """vLLM's interpreter: TUNEFORGE_VLLM_PYTHON, else this one where vLLM is installed here."""
    if settings.vllm_python is not None:
        if not Path(settings.vllm_python).is_file():
            raise ValueError(f"TUNEFORGE_VLLM_PYTHON={settings.vllm_python} does not exist; run `make vllm`")
        return Path(settings.vllm_python)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise ValueError(
        "the vLLM engine needs vLLM: run `make vllm` and set TUNEFORGE_VLLM_PYTHON=.venv-vllm/bin/python, "
        "or pip install 'tuneforge[vllm]' into this environment"
    )


def _vllm_config(
    python: Path, model_path: Path, model_name: str, options: EngineOptions, settings: Settings
) -> VllmConfig:
    from worker.serving.vllm_engine.process import VllmConfig

    o = options.vllm or VllmOverrides()

    def pick(flag: Any, setting: Any) -> Any:
        return setting if flag is None else flag

    return VllmConfig(
        python=python,
        model_path=model_path,
        model_name=model_name,
        max_loras=pick(o.max_loras, settings.vllm_max_loras),
        max_cpu_loras=pick(o.max_cpu_loras, settings.vllm_max_cpu_loras),
        max_lora_rank=pick(o.max_lora_rank, settings.vllm_max_lora_rank),
        tensor_parallel_size=pick(o.tensor_parallel_size, settings.vllm_tensor_parallel_size),
        dtype=pick(o.dtype, settings.vllm_dtype),
        enable_prefix_caching=pick(o.enable_prefix_caching, settings.vllm_enable_prefix_caching),
        gpu_memory_utilization=pick(o.gpu_memory_utilization, settings.vllm_gpu_memory_utilization),
        max_model_len=pick(o.max_model_len, settings.vllm_max_model_len),
        cpu_kv_cache_gib=settings.vllm_cpu_kv_cache_gib,
        # CUDA graphs pay off on a GPU; on the CPU their warm-up only slows startup (~85 s against ~26 s).
        enforce_eager=options.device == "cpu" or (options.device == "auto" and not _has_cuda()),
    )


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _base_model_dir(settings: Settings, base_model: str) -> Path:
    """The base model resolved (built, or fetched from the model store) in the shared model cache. The
    engine runs its own implementation of each served architecture, so a model's own code (auto_map)
    never runs here; such a model is refused unless the operator allowed it
    (TUNEFORGE_TRUST_REMOTE_CODE_MODELS)."""
    return resolve_model_dir(settings, open_blob_store(settings), base_model)


def _engine_config(
    model_path: Path, model_name: str, options: EngineOptions, settings: Settings
) -> EngineConfig:
    """The engine's configuration: the model directory and the name requests use for it, plus the options."""
    from worker.serving.engine import EngineConfig

    return EngineConfig(
        model_path=model_path,
        model_name=model_name,
        dtype=options.dtype,
        device=options.device,
        max_batch_size=options.max_batch_size,
        max_adapters=options.max_adapters,
        speculation_max_batch=options.speculation_max_batch,
        speculation_depth=options.speculation_depth,
        kv_cache_bytes=options.kv_cache_bytes,
        max_lora_rank=options.max_lora_rank,
        kernels=kernel_config(settings, os.environ),
        enable_prefix_caching=options.enable_prefix_caching,
        enable_chunked_prefill=options.enable_chunked_prefill,
    )


def _adapter_source(
    settings: Settings, adapter_dir: Path | None, tenant: str, base_model: str
) -> tuple[AdapterSource, AppContext | None]:
    """A directory of adapters, or tuneforge storage (with the context to close at exit)."""
    from worker.serving.adapters import LocalDirectorySource

    if adapter_dir is not None:
        return LocalDirectorySource(adapter_dir), None
    ctx = AppContext.from_settings(settings)
    cache = settings.data_dir / "serving" / "adapters"
    return StorageAdapterSource(ctx, cache, tenant, base_model=base_model), ctx


@dataclass(frozen=True)
class VersionModel:
    """An adapter version made a model of its own: its directory, and the names it goes by."""

    path: Path
    name: str  # `repo/N`: what requests name it by (as does "")
    base_model: str  # what it was trained on


def version_model(ctx: AppContext, version_uuid: str, cache_dir: Path) -> VersionModel:
    """The version's merged (or whole) model directory under `cache_dir/<uuid>`, made on first use.

    Raises ValueError, naming the version, when it is gone or cannot be made a model: the process then
    exits and the deployment shows failed.
    """
    from worker.job_io import download_files
    from worker.training.merge import model_directory

    with ctx.sessions() as session:
        version = session.scalar(select(AdapterVersion).where(AdapterVersion.uuid == version_uuid))
        if version is None:
            raise ValueError(f"adapter version {version_uuid} no longer exists; delete its deployment")
        try:
            exports.check_servable_as_model(version)
        except ServiceError as exc:
            raise ValueError(exc.message) from None
        name, base_model = versions.version_id(version), version.base_model
        prefix, files = version.artifact_prefix or "", dict(version.artifact_files)
    target = cache_dir / version_uuid
    if not (target / "config.json").is_file():
        base_dir = _base_model_dir(ctx.settings, base_model)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".artifact-", dir=cache_dir) as scratch:
            artifact = download_files(ctx.store, prefix, files, Path(scratch) / "artifact")
            model_directory(base_dir, artifact, target)
        log.info("adapter version %s: made a model at %s", name, target)
    return VersionModel(target, name, base_model)


class VersionModelSource:
    """The adapter source of a process serving one version as its model: it serves no other adapters."""

    def __init__(self, model: VersionModel) -> None:
        self._model = model

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        raise AdapterLoadError(
            f"adapter {adapter_id[:80]!r}: this deployment serves adapter version {self._model.name} merged "
            f"into its base model and loads no adapters per request; name the model as '' or "
            f"{self._model.name!r}, or deploy {self._model.base_model!r} to serve adapters of it"
        )

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        raise AdapterLoadError(f"adapter {adapter.adapter_id}: this deployment loads no adapters")

    def list_available(self, tenant: str | None) -> list[str]:
        return []


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)
