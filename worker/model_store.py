"""Where a worker or serving process finds a base model's files, by the name a job or deployment gives.

Only what lies outside the database is read: built-in models (built here), a Hugging Face hub cache
(read in place), the model store's manifest and files in the blob store (fetched once into the model
cache, every sha256 checked), and the operator's local directories (TUNEFORGE_EXTRA_BASE_MODELS).
A model whose config.json names its own Python code (`auto_map`) is refused unless the operator
allowed it (TUNEFORGE_TRUST_REMOTE_CODE_MODELS).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tuneforge.rules.base_models import (
    BUILTIN_MODELS,
    MANIFEST_NAME,
    STORE_ROOT,
    BaseModelNameError,
    ModelManifest,
    ModelName,
    StoredFile,
    hf_cache_snapshot,
    parse,
)

from app.settings import Settings
from app.storage.base import BlobNotFoundError, BlobStore, ChecksumMismatchError
from worker.training.base_models import BaseModelSourceMissingError, UnknownBaseModelError, resolve_base_model
from worker.training.model_dirs import exclusive_lock, replace_atomically

log = logging.getLogger(__name__)

# Fetched models live in `<model_cache_dir>/store/<slug>/`, beside the built-ins' `<name>/`.
STORE_CACHE = "store"
# Written last into a fetched model's directory: the manifest it was fetched by (so: complete).
FETCHED_RECORD = ".tuneforge-fetched.json"
# A manifest lists at most a couple of thousand small entries plus the model's config.json.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024


class BaseModelUnavailableError(ValueError):
    """The model is not on this worker (nor in the store); the message says how to make it available."""


class RemoteCodeRefusedError(ValueError):
    """The model ships Python code of its own and the operator has not allowed it to run."""


class StoredModelError(ValueError):
    """The model store's copy of a model is incomplete or corrupt; nothing of it was kept."""


# What resolving a base model may raise that tells the user (or operator) what to do.
MODEL_ERRORS: tuple[type[Exception], ...] = (
    UnknownBaseModelError,
    BaseModelSourceMissingError,
    BaseModelUnavailableError,
    RemoteCodeRefusedError,
    StoredModelError,
)


def model_cache_dir(settings: Settings) -> Path:
    """Where built and fetched base models live, shared by training workers and serving processes."""
    return settings.model_cache_dir if settings.model_cache_dir is not None else settings.data_dir / "models"


def resolve_model_dir(settings: Settings, store: BlobStore, name: str) -> Path:
    """The local HF checkpoint directory of base model `name`, built or fetched on first use.

    In order: a built-in model; a hub id or catalogue name in the HF cache; any non-built-in name
    in the model store; an absolute path the operator listed in TUNEFORGE_EXTRA_BASE_MODELS.
    """
    try:
        parsed = parse(name)
    except BaseModelNameError as exc:
        if name in settings.extra_base_models and Path(name).is_absolute():
            return _checked(settings, name, None, _extra_dir(name))
        raise BaseModelUnavailableError(f"base_model: {exc}") from None
    if parsed.kind == "builtin":
        return resolve_base_model(name, model_cache_dir(settings))
    path = _hub_snapshot(settings, parsed) or _fetched(settings, store, parsed)
    if path is None:
        raise BaseModelUnavailableError(
            f"base model {name!r} is not available on this worker: run `{parsed.pull_command}` on the "
            f"control plane to put it in the model store (built-in models: {', '.join(BUILTIN_MODELS)})"
        )
    return _checked(settings, name, parsed, path)


def trusts_remote_code(settings: Settings, name: str) -> bool:
    """Whether the operator allowed `name`'s own code to run (by the name given, its hub id or either
    pinned form)."""
    allowed = set(settings.trust_remote_code_models)
    if name in allowed:
        return True
    try:
        parsed = parse(name)
    except BaseModelNameError:
        return False
    return parsed.canonical in allowed or (parsed.repo_id is not None and parsed.repo_id in allowed)


# --- where a model may lie --------------------------------------------------------------------------


def _hub_snapshot(settings: Settings, parsed: ModelName) -> Path | None:
    if settings.hf_hub_cache is None or parsed.repo_id is None:
        return None
    return hf_cache_snapshot(settings.hf_hub_cache, parsed.repo_id, parsed.revision)


def _extra_dir(name: str) -> Path:
    path = Path(name)
    if not (path / "config.json").is_file():
        raise BaseModelUnavailableError(
            f"base model {name!r} (TUNEFORGE_EXTRA_BASE_MODELS) is not a model directory on this worker: "
            "it has no config.json here; mount the directory at the same path on every worker"
        )
    return path


def _checked(settings: Settings, name: str, parsed: ModelName | None, path: Path) -> Path:
    """`path`, unless its config.json names code of its own that the operator has not allowed."""
    config = _read_config(path / "config.json", name)
    if "auto_map" in config and not trusts_remote_code(settings, name):
        allow = parsed.canonical if parsed is not None else name
        raise RemoteCodeRefusedError(
            f"base model {name!r} ships its own Python code (auto_map in config.json), which workers do "
            f"not run unless the operator allows it: add {allow!r} to TUNEFORGE_TRUST_REMOTE_CODE_MODELS"
        )
    return path


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        too_big = path.stat().st_size > MAX_CONFIG_BYTES
        config = None if too_big else json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoredModelError(f"base model {name!r}: cannot read {path} ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise StoredModelError(
            f"base model {name!r}: {path} is not a JSON object of at most {MAX_CONFIG_BYTES} bytes"
        )
    return config


# --- the model store, fetched once ------------------------------------------------------------------


def _fetched(settings: Settings, store: BlobStore, parsed: ModelName) -> Path | None:
    """The model's files fetched from the store into the model cache; None when the store lacks it."""
    manifest = _store_manifest(store, parsed)
    if manifest is None:
        return None
    slug = parsed.store_prefix[len(STORE_ROOT) : -1]
    parent = model_cache_dir(settings) / STORE_CACHE
    target = parent / slug
    if _is_current(target, manifest):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(parent, manifest, parsed)
    with exclusive_lock(parent / f"{slug}.lock"):
        # Another process may have fetched the same manifest while this one waited for the lock.
        if not _is_current(target, manifest):
            log.info(
                "base model %s: fetching %d bytes from the model store", parsed.given, manifest.total_bytes
            )
            replace_atomically(target, lambda scratch: _download(store, parsed, manifest, scratch))
    return target


def _store_manifest(store: BlobStore, parsed: ModelName) -> ModelManifest | None:
    key = parsed.store_prefix + MANIFEST_NAME
    try:
        if store.stat(key).size > MAX_MANIFEST_BYTES:
            raise StoredModelError(f"base model {parsed.given!r}: {key} is over {MAX_MANIFEST_BYTES} bytes")
        manifest = ModelManifest.model_validate_json(store.read_bytes(key))
    except BlobNotFoundError:
        return None
    except ValidationError as exc:
        raise StoredModelError(
            f"base model {parsed.given!r}: the model store's {key} is not a valid manifest "
            f"({exc.error_count()} errors); re-run `{parsed.pull_command}`"
        ) from None
    paths = {f.path for f in manifest.files}
    if manifest.name != parsed.canonical or "config.json" not in paths or FETCHED_RECORD in paths:
        raise StoredModelError(
            f"base model {parsed.given!r}: the model store's {key} names {manifest.name!r}, lists no "
            f"config.json, or lists {FETCHED_RECORD}; re-run `{parsed.pull_command}`"
        )
    return manifest


def _is_current(target: Path, manifest: ModelManifest) -> bool:
    """A complete earlier fetch of this very manifest, its files still there at their sizes."""
    try:
        record = json.loads((target / FETCHED_RECORD).read_text())
        return record == manifest.model_dump(mode="json") and all(
            (target / f.path).stat().st_size == f.size for f in manifest.files
        )
    except (OSError, ValueError):
        return False


def _check_free_space(parent: Path, manifest: ModelManifest, parsed: ModelName) -> None:
    free = shutil.disk_usage(parent).free
    if free < manifest.total_bytes:
        raise StoredModelError(
            f"base model {parsed.given!r} needs {manifest.total_bytes} bytes in the model cache {parent}, "
            f"which has {free} free; free space there or point TUNEFORGE_MODEL_CACHE_DIR elsewhere"
        )


def _download(store: BlobStore, parsed: ModelName, manifest: ModelManifest, scratch: Path) -> None:
    for stored in manifest.files:
        _download_file(store, parsed, stored, scratch / stored.path)
    # Written last: a directory with this record is a complete, checked fetch of this manifest.
    (scratch / FETCHED_RECORD).write_text(json.dumps(manifest.model_dump(mode="json"), sort_keys=True))


def _download_file(store: BlobStore, parsed: ModelName, stored: StoredFile, dest: Path) -> None:
    key = f"{parsed.store_prefix}files/{stored.path}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fix = f"re-run `{parsed.pull_command}`"
    size = 0
    try:
        with dest.open("wb") as handle:
            # The store checks the sha256 after the last chunk and raises on a mismatch.
            for chunk in store.iter_chunks(key, expected_sha256=stored.sha256):
                size += len(chunk)
                handle.write(chunk)
    except BlobNotFoundError:
        raise StoredModelError(
            f"base model {parsed.given!r}: {stored.path}, listed in its manifest, is missing from the "
            f"model store ({key}); {fix}"
        ) from None
    except ChecksumMismatchError as exc:
        raise StoredModelError(
            f"base model {parsed.given!r}: {stored.path} in the model store is corrupt (sha256 "
            f"{exc.actual}, its manifest says {stored.sha256}); {fix}"
        ) from None
    if size != stored.size:
        raise StoredModelError(
            f"base model {parsed.given!r}: {stored.path} in the model store has {size} bytes, its "
            f"manifest says {stored.size}; {fix}"
        )
