"""Moves a job's bytes between storage and the worker's scratch disk: dataset rows, checkpoints, adapters."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Collection
from pathlib import Path
from typing import Any

from tuneforge.rules.datasets import SPLIT_COLUMN, Split

from app.db import Dataset, DatasetStatus, JobCheckpoint
from app.services import blob_keys
from app.services.dataset_files.formats import DatasetFormatError, read_rows
from app.storage import BlobStore
from app.storage.base import BlobNotFoundError
from worker.training.data import TrainingDataError


def download_rows(store: BlobStore, dataset: Dataset | None) -> list[dict[str, Any]]:
    """The dataset's rows, its bytes checked against the sha256 recorded at upload."""
    if dataset is None:
        raise TrainingDataError("the job's dataset was deleted; upload it again and start a new job")
    if dataset.status != DatasetStatus.CONNECTED:
        reason = dataset.last_error or "wait until its validation finishes"
        raise TrainingDataError(f"dataset {dataset.name!r} is {dataset.status}, not connected: {reason}")
    chunks = store.iter_chunks(dataset.blob_key, expected_sha256=dataset.sha256)
    try:
        return read_rows(chunks, dataset.file_name, mime_type=dataset.mime_type)
    except DatasetFormatError as exc:  # only if the file changed since it was validated
        raise TrainingDataError(str(exc)) from None


def download_checkpoint(store: BlobStore, checkpoint: JobCheckpoint, dest: Path) -> Path:
    """Rebuild a checkpoint directory under `dest`, verifying each file's recorded sha256."""
    return download_files(store, checkpoint.prefix, checkpoint.files, dest / f"step-{checkpoint.step}")


def upload_dir(
    store: BlobStore, local_dir: Path, prefix: str, *, only: Collection[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Put every file under `local_dir` (or just `only`) at `prefix`; returns name → {size, sha256}."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        if only is not None and name not in only:
            continue
        with path.open("rb") as handle:
            info = store.put_stream(f"{prefix}{name}", handle)
        files[name] = {"size": info.size, "sha256": info.sha256}
    return files


def job_rows(
    store: BlobStore, dataset: Dataset | None, held_out: Dataset | None, *, has_held_out: bool
) -> list[dict[str, Any]]:
    """The job's rows. With a separate evaluation dataset (`has_held_out`), its rows follow the training
    dataset's, each row marked with the split it belongs to: the training core splits by that column."""
    rows = download_rows(store, dataset)
    if not has_held_out:
        return rows
    if held_out is None:
        raise TrainingDataError(
            "the job's validation dataset was deleted; upload it again and start a new job"
        )
    evaluation = download_rows(store, held_out)
    return [{**row, SPLIT_COLUMN: Split.TRAIN.value} for row in rows] + [
        {**row, SPLIT_COLUMN: Split.EVALUATION.value} for row in evaluation
    ]


def rows_fingerprint(dataset: Dataset | None, held_out: Dataset | None) -> str | None:
    """What the rows a job reads are keyed by in the tokenised-data cache: the dataset's bytes, and the
    held-out dataset's when the job has one."""
    if dataset is None:
        return None
    if held_out is None:
        return dataset.sha256
    return hashlib.sha256(f"{dataset.sha256}+held-out:{held_out.sha256}".encode()).hexdigest()


def token_cache_for(store: BlobStore, dataset: Dataset | None) -> BlobTokenCache | None:
    """The dataset's tokenised-data cache, in its own directory so that deleting the dataset removes it."""
    prefix = blob_keys.tokenized_prefix(dataset.blob_key) if dataset is not None else None
    return BlobTokenCache(store, prefix) if prefix is not None else None


class BlobTokenCache:
    """The training core's tokenised-data cache, kept in the blob store beside its dataset's file.

    Entries are keyed by a hash of the dataset's bytes, the tokenizer and the data settings, so a
    stale entry is never read; they are safe to delete at any time (the next job re-tokenises).
    """

    def __init__(self, store: BlobStore, prefix: str) -> None:
        self._store, self._prefix = store, prefix

    def get(self, key: str) -> bytes | None:
        try:
            return self._store.read_bytes(f"{self._prefix}{key}.safetensors")
        except BlobNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        self._store.put_stream(f"{self._prefix}{key}.safetensors", io.BytesIO(data))


def download_files(store: BlobStore, prefix: str, files: dict[str, dict[str, Any]], dest: Path) -> Path:
    """Rebuild the files stored at `prefix` under `dest`, each checked against its recorded sha256."""
    for name, meta in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            for chunk in store.iter_chunks(f"{prefix}{name}", expected_sha256=meta.get("sha256")):
                handle.write(chunk)
    return dest
