"""The model store: base models pulled from the Hugging Face hub or imported from a directory, as blobs.

A stored model is `<store_prefix>files/<path>` blobs plus `<store_prefix>manifest.json`
(`tuneforge.rules.base_models`), which workers read, and a `base_models` row, which the control plane
lists and checks names against. An import writes the files, then the manifest, then the row: a model
without its manifest is not there yet, and a row always names a complete model. `remove` undoes them
in the reverse order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.rules.base_models import (
    MANIFEST_NAME,
    BaseModelNameError,
    ModelManifest,
    ModelName,
    StoredFile,
    check_import_name,
    parse,
)
from tuneforge.rules.served_models import model_key_of

from app.db import Deployment, FinetuningJob, StoredModel
from app.errors import ConflictError, InvalidInputError, NotFoundError, ServiceError
from app.services import model_files
from app.services.quotas import ACTIVE_JOB_STATUSES
from app.settings import Settings
from app.storage import CHUNK_BYTES, BlobStore

log = logging.getLogger(__name__)

HUB_UNREACHABLE = (
    "this machine cannot reach the hub; pull on a machine that can, then `tuneforge models import`"
)

TOKEN_FIX = (
    "accept the licence on huggingface.co and set HF_TOKEN (a token of an account that may read it), "
    "then pull again"
)


class HubUnreachableError(ServiceError):
    """The hub could not be asked (offline mode, no network): the operator's fix is another machine."""

    status_code = 503


@dataclass(frozen=True)
class Source:
    """Where a stored model came from: an operator's directory, or a hub repo at a commit."""

    kind: str  # "hub" | "import"
    revision: str | None = None


def import_directory(
    store: BlobStore,
    session: Session,
    settings: Settings,
    directory: Path,
    name: str,
    *,
    replace: bool = False,
) -> StoredModel:
    """Copy a Hugging Face-format model directory into the store under `name` (an imported name)."""
    try:
        model = parse(check_import_name(name))
    except BaseModelNameError as exc:
        raise InvalidInputError(f"--name: {exc}") from None
    return store_directory(store, session, settings, directory, model, Source("import"), replace=replace)


def pull(
    store: BlobStore,
    session: Session,
    settings: Settings,
    name: str,
    *,
    replace: bool = False,
    endpoint: str | None = None,
) -> StoredModel:
    """Download a hub repo (safetensors, configs, tokenizer) and store it under its canonical name.

    `name` is `org/name[@revision]` or a Predibase catalogue name; HF_TOKEN (if set) is sent, for gated
    and private repos; `endpoint` overrides the hub's URL (HF_ENDPOINT does too).
    """
    model = _hub_name(name)
    _require_absent(session, model, replace)  # before gigabytes are downloaded
    session.rollback()
    if _offline():
        raise HubUnreachableError(f"HF_HUB_OFFLINE is set: {HUB_UNREACHABLE}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The data dir, not /tmp: a model is many GB, and /tmp is often a small RAM disk.
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix="pull-") as scratch:
        snapshot = _download(model, Path(scratch), endpoint)
        # A hub cache's snapshot directory is named by the commit it holds.
        source = Source("hub", revision=snapshot.name)
        return store_directory(store, session, settings, snapshot, model, source, replace=replace)


def store_directory(
    store: BlobStore,
    session: Session,
    settings: Settings,
    directory: Path,
    model: ModelName,
    source: Source,
    *,
    replace: bool = False,
) -> StoredModel:
    """The one import path `import_directory` and `pull` share: check, copy with sha256s, manifest, row."""
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: not a directory")
    _require_absent(session, model, replace)
    # No transaction stays open while gigabytes are copied (it would hold locks or a connection).
    session.rollback()
    config = model_files.read_config(directory)
    _check_remote_code(settings, model, config)
    files = model_files.select_files(directory)
    parameters = sum(model_files.tensor_elements(directory / weights) for weights in files.weights)
    try:
        manifest = _copy_model(store, directory, files, model, source, config)
    except BaseException:
        _forget(store, session, model)  # a row only ever names a complete model
        raise
    row = _require_absent(session, model, replace) or StoredModel(name=model.canonical)
    row.source, row.repo_id, row.revision = manifest.source, model.repo_id, source.revision
    row.model_type, row.context_length = model_files.model_type(config), model_files.context_length(config)
    row.parameter_count, row.total_bytes, row.config = parameters, manifest.total_bytes, config
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # imported concurrently under the same name
        session.rollback()
        raise ConflictError(
            f"base model {model.canonical!r} was stored meanwhile by another import"
        ) from None
    return row


def _copy_model(
    store: BlobStore,
    directory: Path,
    files: model_files.ModelFiles,
    model: ModelName,
    source: Source,
    config: dict[str, Any],
) -> ModelManifest:
    """The files, then the manifest that makes them a model; what was under the prefix goes first."""
    prefix = model.store_prefix
    # Manifest first: a replaced model (or an interrupted import's leftovers) is gone before files land.
    store.delete(prefix + MANIFEST_NAME)
    store.delete_prefix(prefix)
    stored = [_put_file(store, prefix, directory, path) for path in files.all]
    manifest = ModelManifest(
        name=model.canonical,
        source="hub" if source.kind == "hub" else "import",
        repo_id=model.repo_id,
        revision=source.revision,
        files=stored,
        config=config,
    )
    store.put_stream(
        prefix + MANIFEST_NAME, [manifest.model_dump_json().encode()], content_type="application/json"
    )
    return manifest


def _forget(store: BlobStore, session: Session, model: ModelName) -> None:
    """After a failed copy: the half-written files and any row of the model they replaced go."""
    try:
        store.delete(model.store_prefix + MANIFEST_NAME)
        store.delete_prefix(model.store_prefix)
        session.execute(delete(StoredModel).where(StoredModel.name == model.canonical))
        session.commit()
    except Exception:  # the copy's own error is the one to report
        log.exception("base model %s: could not clean up after a failed import", model.canonical)


def list_models(session: Session) -> list[StoredModel]:
    return list(session.scalars(select(StoredModel).order_by(StoredModel.name)))


def find(session: Session, name: str) -> StoredModel | None:
    """The stored model a name means (a catalogue name finds its hub repo), or None."""
    try:
        canonical = parse(name).canonical
    except BaseModelNameError:
        return None
    return session.scalar(select(StoredModel).where(StoredModel.name == canonical))


def get(session: Session, name: str) -> StoredModel:
    row = find(session, name)
    if row is None:
        raise NotFoundError(f"base model {name!r} is not in the model store (`tuneforge models list`)")
    return row


def remove(store: BlobStore, session: Session, name: str, *, force: bool = False) -> StoredModel:
    """Delete a stored model's blobs and row; refused while an active job or a deployment names it."""
    row = get(session, name)
    users = users_of(session, row.name)
    if users and not force:
        raise ConflictError(
            f"base model {row.name!r} is in use by {', '.join(users[:5])}"
            f"{' and more' if len(users) > 5 else ''}; wait for them or remove it with --force"
        )
    prefix = parse(row.name).store_prefix
    # Manifest first: from then on no worker starts on a half-deleted model.
    store.delete(prefix + MANIFEST_NAME)
    store.delete_prefix(prefix)
    session.delete(row)
    session.commit()
    return row


def users_of(session: Session, canonical: str) -> list[str]:
    """Active jobs and deployments whose base model means `canonical` (by any of its names)."""
    jobs = session.execute(
        select(FinetuningJob.uuid, FinetuningJob.base_model).where(
            FinetuningJob.status.in_(ACTIVE_JOB_STATUSES)
        )
    )
    deployments = session.execute(select(Deployment.name, Deployment.base_model))
    users = [f"job {uuid}" for uuid, base in jobs if _means(base, canonical)]
    return users + [f"deployment {name}" for name, key in deployments if _means(model_key_of(key), canonical)]


def _means(name: str, canonical: str) -> bool:
    try:
        return parse(name).canonical == canonical
    except BaseModelNameError:
        return False


def _require_absent(session: Session, model: ModelName, replace: bool) -> StoredModel | None:
    existing = session.scalar(select(StoredModel).where(StoredModel.name == model.canonical))
    if existing is not None and not replace:
        raise ConflictError(
            f"base model {model.canonical!r} is already in the model store; pass --replace to overwrite it"
        )
    return existing


def _check_remote_code(settings: Settings, model: ModelName, config: dict[str, object]) -> None:
    if "auto_map" not in config:
        return
    names = {model.given, model.canonical, model.repo_id}
    if names & set(settings.trust_remote_code_models):
        return
    raise InvalidInputError(
        f"{model.canonical}: config.json has auto_map, so the model needs its own Python code to load, "
        "which tuneforge does not run unless told to. If you trust that code, add "
        f"{model.canonical!r} to TUNEFORGE_TRUST_REMOTE_CODE_MODELS and import it again"
    )


def _put_file(store: BlobStore, prefix: str, directory: Path, path: str) -> StoredFile:
    digest = hashlib.sha256()
    info = store.put_stream(f"{prefix}files/{path}", _hashed_chunks(directory / path, digest))
    sha256 = digest.hexdigest()
    if info.sha256 is not None and info.sha256 != sha256:
        raise ServiceError(f"{path}: the blob store recorded sha256 {info.sha256}, the file has {sha256}")
    return StoredFile(path=path, sha256=sha256, size=info.size)


def _hashed_chunks(path: Path, digest: hashlib._Hash) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            yield chunk


# --- the hub ----------------------------------------------------------------------------------------


def _hub_name(name: str) -> ModelName:
    try:
        model = parse(name)
    except BaseModelNameError as exc:
        raise InvalidInputError(str(exc)) from None
    if model.kind != "hub":
        what = "a built-in model; it needs no pull" if model.kind == "builtin" else "not a hub repo id"
        raise InvalidInputError(
            f"{name!r} is {what}. `models pull` takes a Hugging Face repo id ('org/name', optionally "
            "'org/name@revision') or a Predibase catalogue name; a model on disk is "
            "`tuneforge models import DIR`"
        )
    return model


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(model: ModelName, scratch: Path, endpoint: str | None) -> Path:
    """The repo's kept files in a hub cache under `scratch`; hub errors become ones an operator can act on."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            model.repo_id or model.canonical,
            revision=model.revision,
            cache_dir=scratch,
            allow_patterns=model_files.PULL_PATTERNS,
            ignore_patterns=model_files.PULL_IGNORED,
            token=os.environ.get("HF_TOKEN") or None,
            endpoint=endpoint,
        )
    except Exception as exc:
        raise hub_error(model, exc) from exc
    return Path(path)


def hub_error(model: ModelName, exc: Exception) -> Exception:
    """What a huggingface_hub failure means to the operator (the exception itself if not the hub's)."""
    from huggingface_hub import errors

    repo = model.repo_id
    # GatedRepoError is a RepositoryNotFoundError, and the hub answers 401 for a missing repo too (it
    # does not reveal private ones): the order of these checks matters.
    if isinstance(exc, errors.GatedRepoError):
        return ServiceError(f"{repo} is gated: {TOKEN_FIX}", status_code=403)
    if isinstance(exc, errors.RepositoryNotFoundError):
        return NotFoundError(
            f"{repo}: no such repository on the hub (check the spelling; a private one needs HF_TOKEN)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return NotFoundError(f"{repo}: no revision {model.revision!r} (a branch, tag or commit of the repo)")
    if _status(exc) in (401, 403):
        return ServiceError(f"{repo}: the hub refused access: {TOKEN_FIX}", status_code=403)
    # Offline mode and connection failures while the repo is listed arrive as LocalEntryNotFoundError.
    unreachable = errors.LocalEntryNotFoundError | ConnectionError | TimeoutError
    if isinstance(exc, unreachable) or _is_transport_error(exc):
        cause = exc.__cause__ or exc
        return HubUnreachableError(f"{HUB_UNREACHABLE} ({type(cause).__name__})")
    if isinstance(exc, errors.HfHubHTTPError):
        return ServiceError(
            f"{repo}: the hub answered {_status(exc)}: {str(exc).splitlines()[0]}", status_code=502
        )
    return exc


def _is_transport_error(exc: Exception) -> bool:
    """A connection or timeout error of the HTTP library huggingface_hub uses (httpx2, httpx or requests)."""
    return any(
        cls.__name__ in ("TransportError", "ConnectionError", "Timeout")
        and cls.__module__.split(".")[0] in ("httpx2", "httpx", "requests")
        for cls in type(exc).__mro__
    )


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None
