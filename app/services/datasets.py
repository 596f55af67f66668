"""Datasets: the two-step upload, lookup, download links and deletion.

An upload is immutable once registered: the client PUTs to an upload key, and `finish_upload`
copies those bytes to the dataset's own key, which no URL can write to, recording their sha256.
The upload token names that dataset key, which is unique, so a token registers one dataset.
Validation runs on a worker (`app.services.dataset_files.validation`), sent after the commit.
"""

from __future__ import annotations

import logging
import mimetypes
import unicodedata
import uuid
from pathlib import PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import Dataset, DatasetStatus, User
from app.errors import ConflictError, InvalidInputError, NotFoundError, PayloadTooLargeError
from app.services import blob_keys, upload_tokens
from app.services.dataset_files import validation as dataset_validation
from app.services.dataset_files.formats import SUPPORTED_EXTENSIONS
from app.services.names import validate_name
from app.storage import BlobInfo, BlobNotFoundError, StorageError

log = logging.getLogger(__name__)

DEFAULT_CONNECTION = "file_uploads"
MAX_FILE_NAME_CHARS = 255  # the column's width


def begin_upload(
    ctx: AppContext, user: User, file_name: str, base_url: str, size_bytes: int | None = None
) -> tuple[str, str]:
    """Step 1: a URL to PUT the raw file to, and a token that names the upload in step 3.

    A client that declares `size_bytes` may get a direct storage URL bound to exactly that size;
    otherwise the URL is the control plane's, which enforces the upload limit as the bytes stream.
    """
    name = _checked_file_name(file_name)
    limit = ctx.settings.max_upload_bytes
    if size_bytes is not None and size_bytes > limit:
        raise PayloadTooLargeError(
            f"sizeBytes: the file is {size_bytes} bytes; the limit is {limit} (TUNEFORGE_MAX_UPLOAD_BYTES)"
        )
    suffix = PurePosixPath(name).suffix.lower()
    upload_id, tenant = uuid.uuid4(), user.tenant.uuid
    key = f"tenants/{tenant}/uploads/{upload_id}/data{suffix}"
    sealed = f"tenants/{tenant}/uploads/{upload_id}/{blob_keys.UPLOAD_REGISTERED_MARKER}"
    dest = f"tenants/{tenant}/datasets/{upload_id}/data{suffix}"
    url = ctx.store.presigned_put_url(
        key,
        expires_in=ctx.settings.signed_url_ttl_seconds,
        base_url=base_url,
        content_length=size_bytes,
        closed_by=sealed,
    )
    return url, upload_tokens.issue(ctx, user, "dataset", key=key, dest=dest, sealed=sealed, file=name)


def _checked_file_name(file_name: str) -> str:
    name = PurePosixPath(file_name or "").name
    if PurePosixPath(name).suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise InvalidInputError(
            f"fileName: {file_name[:100]!r} has an unsupported extension; "
            f"use one of {', '.join(sorted(SUPPORTED_EXTENSIONS))}"
        )
    if len(name) > MAX_FILE_NAME_CHARS:
        raise InvalidInputError(f"fileName: at most {MAX_FILE_NAME_CHARS} characters (got {len(name)})")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise InvalidInputError(
            "fileName: must not contain control characters (e.g. line breaks) or unpaired surrogates"
        )
    return name


def finish_upload(ctx: AppContext, session: Session, user: User, name: str, upload_token: str) -> Dataset:
    """Step 3: register the uploaded bytes as a dataset (once per token), then send it to be validated."""
    validate_name(name, "name")
    claims = upload_tokens.verify(ctx, user, upload_token, "dataset")
    if "sealed" not in claims:
        raise InvalidInputError("uploadToken: issued by an older server; start the upload again")
    done = session.scalar(select(Dataset).where(Dataset.blob_key == claims["dest"]))
    if done is not None:
        # A client retrying after a lost response gets the dataset it already created.
        if done.name == name and done.tenant_id == user.tenant_id:
            return done
        raise _already_registered(done.name)
    if ctx.store.exists(claims["sealed"]):
        raise _already_registered(None)
    _uploaded_size(ctx, claims["key"])
    if _find(session, user, name, DEFAULT_CONNECTION) is not None:
        raise ConflictError(f"name: a dataset called {name!r} already exists; pick another name or delete it")
    dataset = _claim(session, user, name, claims)
    try:
        sealed = _seal(ctx, claims["key"], claims["dest"])
        ctx.store.put_stream(claims["sealed"], [dataset.uuid.encode()])
    except BaseException:
        session.delete(dataset)
        session.commit()
        raise
    dataset.size_bytes, dataset.sha256 = sealed.size, sealed.sha256
    session.commit()
    _delete_quietly(ctx, claims["key"])
    dataset_validation.enqueue(ctx, session, dataset)
    return dataset


def _uploaded_size(ctx: AppContext, key: str) -> int:
    try:
        info = ctx.store.stat(key)
    except BlobNotFoundError:
        raise InvalidInputError(
            "uploadToken: no file was uploaded for this token; PUT the file to presignedUrl first"
        ) from None
    limit = ctx.settings.max_upload_bytes
    if info.size > limit:
        ctx.store.delete(key)
        raise PayloadTooLargeError(
            f"file is {info.size} bytes; the limit is {limit} (TUNEFORGE_MAX_UPLOAD_BYTES)"
        )
    return info.size


def _claim(session: Session, user: User, name: str, claims: dict[str, str]) -> Dataset:
    """Insert the row first: the unique dataset key lets exactly one registration of a token win."""
    dataset = Dataset(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        name=name,
        connection_name=DEFAULT_CONNECTION,
        status=DatasetStatus.VALIDATING,
        file_name=claims["file"],
        mime_type=mimetypes.guess_type(claims["file"])[0] or "application/octet-stream",
        blob_key=claims["dest"],
    )
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:  # a concurrent registration took the token or the name
        session.rollback()
        winner = session.scalar(select(Dataset).where(Dataset.blob_key == claims["dest"]))
        if winner is not None:
            raise _already_registered(winner.name) from None
        raise ConflictError(f"name: a dataset called {name!r} already exists") from None
    return dataset


def _already_registered(name: str | None) -> ConflictError:
    registered = f"as dataset {name!r}" if name else "(as a dataset since deleted)"
    return ConflictError(
        f"uploadToken: this upload is already registered {registered}; an upload registers one "
        "dataset, so begin a new upload for another"
    )


def _seal(ctx: AppContext, upload_key: str, dest: str) -> BlobInfo:
    """Copy the upload to the dataset's key: later PUTs to the upload URL cannot reach these bytes."""
    try:
        ctx.store.copy(upload_key, dest)
    except BlobNotFoundError:
        raise InvalidInputError(
            "uploadToken: no file was uploaded for this token; PUT the file to presignedUrl first"
        ) from None
    sealed = ctx.store.stat(dest)
    limit = ctx.settings.max_upload_bytes
    if sealed.size > limit:  # replaced by a larger file between the check and the copy
        ctx.store.delete(dest)
        raise PayloadTooLargeError(
            f"file is {sealed.size} bytes; the limit is {limit} (TUNEFORGE_MAX_UPLOAD_BYTES)"
        )
    return sealed


def _delete_quietly(ctx: AppContext, key: str) -> None:
    try:
        ctx.store.delete(key)
    except StorageError:  # only space is lost: an abandoned upload, which `tuneforge gc` removes
        log.warning("could not delete the registered upload %s", key, exc_info=True)


def _find(session: Session, user: User, name: str, connection: str) -> Dataset | None:
    return session.scalar(
        select(Dataset).where(
            Dataset.tenant_id == user.tenant_id,
            Dataset.connection_name == connection,
            Dataset.name == name,
        )
    )


def get_by_name(session: Session, user: User, name: str, connection: str = DEFAULT_CONNECTION) -> Dataset:
    dataset = _find(session, user, name, connection or DEFAULT_CONNECTION)
    if dataset is None:
        raise NotFoundError(f"dataset {name!r} not found")
    return dataset


def get(session: Session, user: User, ref: str) -> Dataset:
    """By uuid or by name (`name` or `connection/name`)."""
    dataset = session.scalar(select(Dataset).where(Dataset.tenant_id == user.tenant_id, Dataset.uuid == ref))
    if dataset is not None:
        return dataset
    connection, _, name = ref.rpartition("/")
    return get_by_name(session, user, name, connection or DEFAULT_CONNECTION)


def list_datasets(session: Session, user: User, limit: int, offset: int) -> tuple[list[Dataset], int]:
    owned = Dataset.tenant_id == user.tenant_id
    total = session.scalar(select(func.count()).select_from(Dataset).where(owned)) or 0
    query = select(Dataset).where(owned).order_by(Dataset.created_at.desc(), Dataset.id.desc())
    rows = session.scalars(query.limit(limit).offset(offset)).all()
    return list(rows), total


def download_link(ctx: AppContext, dataset: Dataset, base_url: str) -> str:
    """A URL for the registered bytes, refused if storage no longer holds what was registered."""
    try:
        recorded = ctx.store.stat(dataset.blob_key).sha256
    except BlobNotFoundError:
        missing = f"dataset {dataset.name!r}: its file is missing from storage; upload it again"
        raise NotFoundError(missing) from None
    if dataset.sha256 and recorded and recorded != dataset.sha256:
        log.error(
            "dataset %s: stored sha256 %s differs from registered %s", dataset.uuid, recorded, dataset.sha256
        )
        raise ConflictError(
            f"dataset {dataset.name!r}: the stored file no longer matches the sha256 recorded when it "
            "was registered; upload it again"
        )
    return ctx.store.presigned_get_url(
        dataset.blob_key,
        expires_in=ctx.settings.signed_url_ttl_seconds,
        base_url=base_url,
        filename=dataset.file_name,
        sha256=dataset.sha256,
    )


def delete(ctx: AppContext, session: Session, dataset: Dataset) -> None:
    """The row, then its file and tokenised caches (its whole directory, see `blob_keys`)."""
    # Row first: a crash between the two leaves orphan blobs for `tuneforge gc`, never a row
    # pointing at nothing.
    key = dataset.blob_key
    session.delete(dataset)
    session.commit()
    directory = blob_keys.dataset_dir(key)
    if directory is None:
        ctx.store.delete(key)
    else:
        ctx.store.delete_prefix(directory)
