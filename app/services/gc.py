"""Garbage collection of the blob store: tenant blobs no row points at, found by key and removed.

An orphan is an owner directory (see `blob_keys` for the layout) that no row owns: a dataset upload
(never registered, or registered and copied out: no row ever points at one), a dataset directory,
staged adapter upload, version artifact or checkpoint whose row is gone, bytes a crash left behind
between a row's delete and its blobs', a pruned checkpoint a worker could not delete, tokenised
caches of the earlier layout. Every blob is written before the row that points at it, so an owner
is removed only once its newest blob is older than `min_age` (a day by default: far past an upload
token's life and a checkpoint's bookkeeping).

Blobs are listed before rows are read, so a row committed during the listing keeps its blobs.
Keys outside the layout (anything not under `tenants/`, or of an unknown kind) are never touched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import AdapterVersion, Dataset, JobCheckpoint
from app.db.base import utcnow
from app.services import blob_keys
from app.storage import BlobStore, StoredBlob


@dataclass
class Orphan:
    """One owner directory (or old cache entry) no row points at, with the blobs found under it."""

    prefix: str
    blobs: list[StoredBlob] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs)

    @property
    def newest(self) -> datetime:
        return max(blob.modified for blob in self.blobs)


@dataclass
class GcReport:
    removable: list[Orphan]  # old enough: removed, or what a dry run would remove
    too_recent: list[Orphan]  # unreferenced but younger than min_age: perhaps still being written
    dry_run: bool

    @property
    def freed_bytes(self) -> int:
        return sum(orphan.size for orphan in self.removable)

    @property
    def freed_blobs(self) -> int:
        return sum(len(orphan.blobs) for orphan in self.removable)


def collect(
    store: BlobStore,
    session: Session,
    *,
    min_age: timedelta,
    dry_run: bool,
    upload_token_ttl: timedelta = timedelta(0),
    now: datetime | None = None,
) -> GcReport:
    """Find the orphans and, unless `dry_run`, delete every blob of those older than `min_age`.

    A dataset upload's directory is never pointed at by a row (registration copies its bytes out);
    once registered, its marker is what keeps the upload token used up, so it stays at least as long
    as an upload token lives (`upload_token_ttl`), whatever `min_age` says.
    """
    orphans = find_orphans(store, session)
    moment = now or utcnow()

    def old(orphan: Orphan) -> bool:
        keys = [blob.key for blob in orphan.blobs]
        registered = blob_keys.is_registered_upload(orphan.prefix, keys)
        age = max(min_age, upload_token_ttl) if registered else min_age
        return orphan.newest < moment - age

    report = GcReport(
        removable=[o for o in orphans if old(o)],
        too_recent=[o for o in orphans if not old(o)],
        dry_run=dry_run,
    )
    if not dry_run:
        for orphan in report.removable:
            # Key by key, not the prefix: a blob written under it since the listing is not ours to judge.
            for blob in orphan.blobs:
                store.delete(blob.key)
    return report


def find_orphans(store: BlobStore, session: Session) -> list[Orphan]:
    """Owners under `tenants/` that no dataset, version or checkpoint row points at, sorted by prefix."""
    by_owner: dict[str, list[StoredBlob]] = defaultdict(list)
    for blob in store.list_blobs(blob_keys.TENANTS):
        owner = blob_keys.owner_prefix(blob.key)
        if owner is not None:
            by_owner[owner].append(blob)
    live = _referenced_prefixes(session)
    return [Orphan(owner, blobs) for owner, blobs in sorted(by_owner.items()) if owner not in live]


def _referenced_prefixes(session: Session) -> set[str]:
    """The owner directories rows point at; a dataset's file outside the layout is its own owner."""
    live = {blob_keys.dataset_dir(key) or key for key in session.scalars(select(Dataset.blob_key))}
    live.update(
        prefix for prefix in session.scalars(select(AdapterVersion.artifact_prefix)) if prefix is not None
    )
    live.update(session.scalars(select(JobCheckpoint.prefix)))
    return live
