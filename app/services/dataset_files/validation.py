"""Dataset validation's lifecycle: enqueue after commit, one attempt on a worker, its verdict, re-sends.

A `validating` dataset reaches its verdict on a `tuneforge.validate` worker, never in the API
process. The API sends the dataset id right after the upload's commit; the sweeper (the control
plane's sweeping thread) sends what the broker never got and re-sends what a lost worker left
without a verdict. Every attempt is counted when it starts; an attempt past
`validation_max_attempts` records `errored` instead of validating again, so a file that kills its
validator is not retried forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import Dataset, DatasetStatus
from app.db.base import utcnow
from app.queue import EnqueueError
from app.services.dataset_files.formats import (
    MAX_NESTING,
    DatasetFormatError,
    DatasetProfile,
    profile_dataset,
)
from app.settings import Settings
from app.storage import BlobNotFoundError, ChecksumMismatchError

log = logging.getLogger(__name__)

# A dataset the API enqueues itself right after its commit is not the sweeper's business yet.
ENQUEUE_GRACE_SECONDS = 2.0
# Celery kills a validation this long after its soft time limit asked it to stop.
HARD_LIMIT_GRACE_SECONDS = 30
# Re-sent only once an attempt started now would have been killed, plus this: never while one runs.
_RESEND_MARGIN_SECONDS = 30
_SWEEP_BATCH = 100
_STORED_ERROR_CHARS = 4000  # last_error is shown to users; a message never needs more


def hard_time_limit(settings: Settings) -> int:
    return settings.validation_time_limit_seconds + HARD_LIMIT_GRACE_SECONDS


def enqueue(ctx: AppContext, session: Session, dataset: Dataset) -> bool:
    """Send the committed dataset's id to be validated; False (left for the sweeper) if the broker is down."""
    try:
        ctx.queue.send_validate(dataset.id)
    except EnqueueError as exc:
        log.warning("dataset %s stays validating until the broker is back: %s", dataset.uuid, exc)
        return False
    dataset.validation_enqueued_at = utcnow()
    session.commit()
    return True


def sweep(ctx: AppContext) -> int:
    """Send datasets never sent, and re-send those an attempt left without a verdict; returns the count."""
    now = utcnow()
    stale = now - timedelta(seconds=hard_time_limit(ctx.settings) + _RESEND_MARGIN_SECONDS)
    with ctx.sessions() as session:
        query = (
            select(Dataset)
            .where(
                Dataset.status == DatasetStatus.VALIDATING,
                or_(
                    and_(
                        Dataset.validation_enqueued_at.is_(None),
                        Dataset.created_at < now - timedelta(seconds=ENQUEUE_GRACE_SECONDS),
                    ),
                    # Starting an attempt touches updated_at: a running one is never re-sent.
                    and_(Dataset.validation_enqueued_at < stale, Dataset.updated_at < stale),
                ),
            )
            .order_by(Dataset.created_at, Dataset.id)
            .limit(_SWEEP_BATCH)
        )
        sent = 0
        for dataset in list(session.scalars(query)):
            if not enqueue(ctx, session, dataset):
                break  # the broker is still down; the next pass tries again
            sent += 1
    return sent


@dataclass(frozen=True)
class _Attempt:
    number: int
    key: str
    file_name: str
    mime_type: str
    sha256: str | None


def validate(ctx: AppContext, dataset_id: int) -> None:
    """One attempt: profile the stored file and record the verdict. Safe to deliver twice.

    Storage errors propagate (the dataset stays `validating`, the sweeper re-sends it); every
    other outcome, a MemoryError under the worker's cap and a RecursionError included, is a verdict.
    """
    attempt = _begin_attempt(ctx, dataset_id)
    if attempt is None:
        return
    limit = ctx.settings.validation_max_attempts
    if attempt.number > limit:
        fail(
            ctx,
            dataset_id,
            f"validation was started {limit} times and never finished (the validating worker was lost, "
            "killed or could not read storage each time); upload the file again, and if this repeats "
            "ask an administrator to check the validate workers' logs",
        )
        return
    verdict = _profile(ctx, attempt)
    if isinstance(verdict, str):
        fail(ctx, dataset_id, verdict)
        return
    _record(
        ctx,
        dataset_id,
        status=DatasetStatus.CONNECTED,
        last_error=None,
        format=verdict.format,
        row_count=verdict.row_count,
        columns=verdict.columns,
        split_counts=verdict.split_counts,
        preview=verdict.preview,
        size_bytes=verdict.size_bytes,
        sha256=verdict.sha256,
    )


def fail(ctx: AppContext, dataset_id: int, message: str) -> None:
    """End a `validating` dataset `errored` with `message` (what the SDK shows as the failure)."""
    _record(ctx, dataset_id, status=DatasetStatus.ERRORED, last_error=_storable(message))


def _begin_attempt(ctx: AppContext, dataset_id: int) -> _Attempt | None:
    """Count the attempt (atomically, so duplicate deliveries both count); None if a verdict exists."""
    with ctx.sessions() as session:
        counted: Any = session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == DatasetStatus.VALIDATING)
            .values(validation_attempts=Dataset.validation_attempts + 1, updated_at=utcnow())
        )
        session.commit()
        dataset = session.get(Dataset, dataset_id)
        if not counted.rowcount or dataset is None:
            log.info("dataset %s has a verdict or is gone; dropping this delivery", dataset_id)
            return None
        return _Attempt(
            number=dataset.validation_attempts,
            key=dataset.blob_key,
            file_name=dataset.file_name,
            mime_type=dataset.mime_type,
            sha256=dataset.sha256,
        )


def _profile(ctx: AppContext, attempt: _Attempt) -> DatasetProfile | str:
    """The profile, or the message a user sees; returned from outside `except` so memory is freed first."""
    try:
        return profile_dataset(
            ctx.store.iter_chunks(attempt.key, expected_sha256=attempt.sha256),
            attempt.file_name,
            preview_rows=ctx.settings.dataset_preview_rows,
            mime_type=attempt.mime_type,
        )
    except DatasetFormatError as exc:
        return str(exc)
    except ChecksumMismatchError:
        return "the stored file no longer matches the sha256 recorded when it was registered; upload it again"
    except BlobNotFoundError:
        return "the uploaded file is missing from storage; upload it again"
    except MemoryError:
        return (
            f"validating the file needed more than {ctx.settings.validation_memory_bytes} bytes of memory "
            "(TUNEFORGE_VALIDATION_MEMORY_BYTES); make its rows smaller or split it into several files"
        )
    except RecursionError:
        return f"the file nests too deeply to validate; keep rows under {MAX_NESTING} levels of nesting"


def _record(ctx: AppContext, dataset_id: int, **fields: object) -> None:
    with ctx.sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != DatasetStatus.VALIDATING:
            return  # deleted while being validated, or a duplicate delivery already decided
        for name, value in fields.items():
            setattr(dataset, name, value)
        session.commit()
    log.info("dataset %s validated: %s", dataset_id, fields["status"])


def _storable(message: str) -> str:
    """A text column holds no NUL and no lone surrogate; a message never needs to be long."""
    text = message.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= _STORED_ERROR_CHARS else text[: _STORED_ERROR_CHARS - 1] + "…"
