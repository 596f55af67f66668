"""OpenAI's Files API over datasets: a file is a dataset, named `file-<its uuid as hex>`.

An upload runs the dataset upload path (the bytes sealed under the dataset's key, then validated on a
validate worker) and waits a bounded time for the verdict, so the answer is usually `processed`, or
a 400 carrying the validation message; a verdict slower than the wait leaves the file `uploaded`,
and its status (with `status_details` on an error) says the rest later.
"""

from __future__ import annotations

import secrets
import time
import uuid as uuid_lib
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import Dataset, DatasetStatus, User
from app.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from app.services import datasets, upload_tokens
from app.storage import BlobTooLargeError

FILE_PREFIX = "file-"
# The one purpose tuneforge keeps files for; OpenAI's others (assistants, batch, ...) have no use here.
PURPOSE = "fine-tune"
STATUSES = {
    DatasetStatus.VALIDATING: "uploaded",
    DatasetStatus.CONNECTED: "processed",
    DatasetStatus.ERRORED: "error",
}
# How long an upload waits for the validate worker's verdict (a small JSONL file takes well under a second).
VERDICT_WAIT_SECONDS = 30.0
_POLL_SECONDS = 0.1


def file_id(dataset: Dataset) -> str:
    return FILE_PREFIX + uuid_lib.UUID(dataset.uuid).hex


def status_of(dataset: Dataset) -> str:
    return STATUSES.get(DatasetStatus(dataset.status), "uploaded")


def get(session: Session, user: User, ref: str, param: str = "file_id") -> Dataset:
    """The caller's file `file-<hex>`; 404 naming `param` for anything else (another tenant's included)."""
    dataset_uuid = _uuid_of(ref)
    found = None
    if dataset_uuid is not None:
        owned = and_(Dataset.tenant_id == user.tenant_id, Dataset.uuid == dataset_uuid)
        found = session.scalar(select(Dataset).where(owned))
    if found is None:
        raise NotFoundError(f"{param}: no file {ref[:80]!r}; GET /v1/files lists your files")
    return found


def _uuid_of(ref: str) -> str | None:
    if not ref.startswith(FILE_PREFIX) or len(ref) != len(FILE_PREFIX) + 32:
        return None
    try:
        return str(uuid_lib.UUID(hex=ref.removeprefix(FILE_PREFIX)))
    except ValueError:
        return None


def require_purpose(purpose: str) -> None:
    if purpose != PURPOSE:
        raise InvalidInputError(
            f"purpose: {purpose[:40]!r} is not supported; tuneforge keeps files for fine-tuning only, "
            f"so pass purpose={PURPOSE!r}"
        )


def upload(
    ctx: AppContext, session: Session, user: User, file_name: str, content: BinaryIO, base_url: str
) -> Dataset:
    """Store `content` as a new dataset and wait (bounded) for its validation verdict."""
    try:
        _, token = datasets.begin_upload(ctx, user, file_name, base_url)
    except InvalidInputError as exc:  # its messages name the Predibase field
        raise InvalidInputError("file: " + exc.message.removeprefix("fileName: ")) from None
    key = upload_tokens.verify(ctx, user, token, "dataset")["key"]
    limit = ctx.settings.max_upload_bytes
    try:
        ctx.store.put_stream(key, content, max_bytes=limit)
    except BlobTooLargeError:
        raise PayloadTooLargeError(
            f"file: larger than the limit of {limit} bytes (TUNEFORGE_MAX_UPLOAD_BYTES)"
        ) from None
    dataset = datasets.finish_upload(ctx, session, user, f"openai-{secrets.token_hex(8)}", token)
    _await_verdict(session, dataset)
    if dataset.status == DatasetStatus.ERRORED:
        message = dataset.last_error or "the file could not be read as a dataset"
        datasets.delete(ctx, session, dataset)  # never handed out: its id would name nothing usable
        raise InvalidInputError(f"file: {message}")
    return dataset


def _await_verdict(session: Session, dataset: Dataset) -> None:
    deadline = time.monotonic() + VERDICT_WAIT_SECONDS
    while dataset.status == DatasetStatus.VALIDATING and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        session.commit()  # a new transaction, so the validate worker's commit is visible
        session.refresh(dataset)


@dataclass(frozen=True)
class Page:
    rows: list[Dataset]
    has_more: bool


def list_files(
    session: Session, user: User, *, purpose: str | None, limit: int, after: str | None, order: str
) -> Page:
    """The caller's files by creation time (`order` asc or desc), after the file `after`."""
    if purpose is not None and purpose != PURPOSE:
        return Page([], False)  # no file of another purpose exists here
    query = select(Dataset).where(Dataset.tenant_id == user.tenant_id)
    newest_first = order == "desc"
    if after is not None:
        cursor = get(session, user, after, "after")
        if newest_first:
            query = query.where(
                or_(
                    Dataset.created_at < cursor.created_at,
                    and_(Dataset.created_at == cursor.created_at, Dataset.id < cursor.id),
                )
            )
        else:
            query = query.where(
                or_(
                    Dataset.created_at > cursor.created_at,
                    and_(Dataset.created_at == cursor.created_at, Dataset.id > cursor.id),
                )
            )
    if newest_first:
        query = query.order_by(Dataset.created_at.desc(), Dataset.id.desc())
    else:
        query = query.order_by(Dataset.created_at.asc(), Dataset.id.asc())
    rows = list(session.scalars(query.limit(limit + 1)))
    return Page(rows[:limit], len(rows) > limit)
