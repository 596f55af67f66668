"""Datasets: the two-step upload, lookup, download links, deletion, and recording validation results."""

from __future__ import annotations

import logging
import mimetypes
import uuid
from pathlib import PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import Dataset, DatasetStatus, User
from app.errors import ConflictError, InvalidInputError, NotFoundError, PayloadTooLargeError
from app.services import blob_keys, upload_tokens
from app.services.dataset_formats import SUPPORTED_EXTENSIONS, DatasetFormatError, profile_dataset
from app.services.names import validate_name
from app.storage import BlobNotFoundError

log = logging.getLogger(__name__)

DEFAULT_CONNECTION = "file_uploads"


def begin_upload(ctx: AppContext, user: User, file_name: str, base_url: str) -> tuple[str, str]:
    """Step 1: a URL to PUT the raw file to, and a token that names the upload in step 3."""
    suffix = PurePosixPath(file_name or "").suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise InvalidInputError(
            f"fileName: {file_name!r} has an unsupported extension; "
            f"use one of {', '.join(sorted(SUPPORTED_EXTENSIONS))}"
        )
    key = f"tenants/{user.tenant.uuid}/datasets/{uuid.uuid4()}/data{suffix}"
    settings = ctx.settings
    url = ctx.store.presigned_put_url(key, expires_in=settings.signed_url_ttl_seconds, base_url=base_url)
    token = upload_tokens.issue(ctx, user, "dataset", key=key, file=PurePosixPath(file_name).name)
    return url, token


def finish_upload(ctx: AppContext, session: Session, user: User, name: str, upload_token: str) -> Dataset:
    """Step 3: register the uploaded bytes as a dataset; validation runs after the commit, elsewhere."""
    validate_name(name, "name")
    claims = upload_tokens.verify(ctx, user, upload_token, "dataset")
    # A client retrying after a lost response gets the dataset it already created, not a 409.
    done = session.scalar(
        select(Dataset).where(Dataset.tenant_id == user.tenant_id, Dataset.blob_key == claims["key"])
    )
    if done is not None and done.name == name:
        return done
    try:
        info = ctx.store.stat(claims["key"])
    except BlobNotFoundError:
        raise InvalidInputError(
            "uploadToken: no file was uploaded for this token; PUT the file to presignedUrl first"
        ) from None
    if info.size > ctx.settings.max_upload_bytes:
        ctx.store.delete(claims["key"])
        raise PayloadTooLargeError(
            f"file is {info.size} bytes; the limit is {ctx.settings.max_upload_bytes} "
            "(TUNEFORGE_MAX_UPLOAD_BYTES)"
        )
    if _find(session, user, name, DEFAULT_CONNECTION) is not None:
        raise ConflictError(f"name: a dataset called {name!r} already exists; pick another name or delete it")
    dataset = Dataset(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        name=name,
        connection_name=DEFAULT_CONNECTION,
        status=DatasetStatus.VALIDATING,
        file_name=claims["file"],
        mime_type=mimetypes.guess_type(claims["file"])[0] or "application/octet-stream",
        blob_key=claims["key"],
        size_bytes=info.size,
    )
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:  # a concurrent upload took the name between our check and the insert
        session.rollback()
        raise ConflictError(f"name: a dataset called {name!r} already exists") from None
    return dataset


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
    return ctx.store.presigned_get_url(
        dataset.blob_key,
        expires_in=ctx.settings.signed_url_ttl_seconds,
        base_url=base_url,
        filename=dataset.file_name,
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


def validate(ctx: AppContext, dataset_id: int) -> None:
    """Profile the stored file and record the verdict. Safe to run twice (a re-run re-validates)."""
    with ctx.sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != DatasetStatus.VALIDATING:
            return
        key, file_name, mime_type = dataset.blob_key, dataset.file_name, dataset.mime_type
    # Storage errors propagate: the dataset stays `validating` and the next sweep retries it.
    try:
        profile = profile_dataset(
            ctx.store.iter_chunks(key),
            file_name,
            preview_rows=ctx.settings.dataset_preview_rows,
            mime_type=mime_type,
        )
    except DatasetFormatError as exc:
        _record(ctx, dataset_id, status=DatasetStatus.ERRORED, last_error=str(exc))
        return
    _record(
        ctx,
        dataset_id,
        status=DatasetStatus.CONNECTED,
        last_error=None,
        format=profile.format,
        row_count=profile.row_count,
        columns=profile.columns,
        split_counts=profile.split_counts,
        preview=profile.preview,
        size_bytes=profile.size_bytes,
        sha256=profile.sha256,
    )


def _record(ctx: AppContext, dataset_id: int, **fields: object) -> None:
    with ctx.sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:  # deleted while being validated
            return
        for field, value in fields.items():
            setattr(dataset, field, value)
        session.commit()
    log.info("dataset %s validated: %s", dataset_id, fields["status"])


def pending_validation_ids(ctx: AppContext) -> list[int]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Dataset.id).where(Dataset.status == DatasetStatus.VALIDATING)))
