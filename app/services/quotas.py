"""Per-tenant limits: active jobs and stored bytes (from the database), serving requests (in process).

Every refusal is a `TooManyRequestsError` (429 + Retry-After). The Predibase SDK (urllib3's Retry)
sleeps Retry-After before each of its four retries, so the values stay short: a refused SDK call
fails with the message within minutes instead of hanging for hours.

The serving limits are counted by each API process for the requests it proxies: with N API
replicas a tenant may have up to N times the limit in flight, which is still bounded, and needs no
shared counter on the request path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import AdapterVersion, Dataset, FinetuningJob, JobCheckpoint, JobStatus, Repo, Tenant
from app.db.base import utcnow
from app.errors import TooManyRequestsError
from app.settings import Settings

ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.STOPPING)
# Jobs take minutes to hours; a minute is the soonest a retry has a fair chance.
JOB_RETRY_AFTER_SECONDS = 60
# Storage frees only when the tenant deletes something; retrying sooner would only repeat the 429.
STORAGE_RETRY_AFTER_SECONDS = 60
# Serving requests finish in seconds.
WAITING_RETRY_AFTER_SECONDS = 1
# Past this many tenants' buckets, full ones (indistinguishable from absent ones) are dropped.
_MAX_IDLE_BUCKETS = 4096


def require_job_slot(session: Session, tenant_id: int, limit: int) -> None:
    """Refuse a new job while the tenant has `limit` queued or running ones.

    Race-safe: the tenant's row is written first, which serialises concurrent job creations of one
    tenant until the caller commits (a row lock on PostgreSQL, the write lock on SQLite, which has
    no SELECT ... FOR UPDATE), so two requests cannot both take the last slot.
    """
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    active = session.scalar(
        select(func.count())
        .select_from(FinetuningJob)
        .where(FinetuningJob.tenant_id == tenant_id, FinetuningJob.status.in_(ACTIVE_JOB_STATUSES))
    )
    if (active or 0) >= limit:
        raise TooManyRequestsError(
            f"too many fine-tuning jobs: this tenant has {active} queued or training (limit {limit}, "
            "TUNEFORGE_TENANT_MAX_ACTIVE_JOBS); wait for one to finish or cancel one",
            retry_after=JOB_RETRY_AFTER_SECONDS,
        )


def stored_bytes(session: Session, tenant_id: int) -> int:
    """Datasets + adapter versions' files + job checkpoints' files, as recorded in their rows."""
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    artifacts = session.scalars(
        select(AdapterVersion.artifact_files)
        .join(Repo, Repo.id == AdapterVersion.repo_id)
        .where(Repo.tenant_id == tenant_id)
    )
    checkpoints = session.scalars(
        select(JobCheckpoint.files)
        .join(FinetuningJob, FinetuningJob.id == JobCheckpoint.job_id)
        .where(FinetuningJob.tenant_id == tenant_id)
    )
    return int(datasets or 0) + _files_bytes(artifacts) + _files_bytes(checkpoints)


def require_storage_room(session: Session, tenant_id: int, limit: int) -> None:
    """Refuse new uploads and jobs once the tenant stores `limit` bytes or more.

    Checked before the new bytes are known (an upload is registered after its bytes arrived), so a
    tenant under the limit may pass it by the uploads it registers at that moment, each bounded by
    TUNEFORGE_MAX_UPLOAD_BYTES; nothing more is accepted until it deletes enough.
    """
    used = stored_bytes(session, tenant_id)
    if used >= limit:
        raise TooManyRequestsError(
            f"storage quota reached: this tenant stores {used} bytes of datasets, adapters and checkpoints "
            f"(limit {limit}, TUNEFORGE_TENANT_MAX_STORED_BYTES); delete datasets or adapter versions "
            "to make room",
            retry_after=STORAGE_RETRY_AFTER_SECONDS,
        )


def _files_bytes(file_maps: Iterable[Any]) -> int:
    total = 0
    for files in file_maps:
        for meta in (files or {}).values():
            size = meta.get("size") if isinstance(meta, dict) else None
            total += size if isinstance(size, int) else 0
    return total


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class ServingSlot:
    """One admitted proxy request; `release` (idempotent) gives its place back."""

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back()


class ServingLimits:
    """Requests in flight and a token bucket per tenant, for the requests this process proxies."""

    def __init__(
        self,
        *,
        max_waiting: int,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_waiting, self._rate, self._burst = max_waiting, rate, burst
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingLimits:
        return cls(
            max_waiting=settings.tenant_max_waiting_requests,
            rate=settings.tenant_requests_per_second,
            burst=settings.tenant_request_burst,
        )

    def admit(self, tenant: str) -> ServingSlot:
        """A slot for one request, or 429: too many in flight (checked first, costs no token), or too fast."""
        with self._lock:
            waiting = self._waiting.get(tenant, 0)
            if waiting >= self._max_waiting:
                raise TooManyRequestsError(
                    f"too many serving requests in flight for this tenant ({waiting}, limit "
                    f"{self._max_waiting}, TUNEFORGE_TENANT_MAX_WAITING_REQUESTS); wait for some to finish",
                    retry_after=WAITING_RETRY_AFTER_SECONDS,
                )
            self._take_token(tenant)
            self._waiting[tenant] = waiting + 1
        return ServingSlot(lambda: self._release(tenant))

    def waiting(self, tenant: str) -> int:
        with self._lock:
            return self._waiting.get(tenant, 0)

    def _take_token(self, tenant: str) -> None:
        now = self._clock()
        if len(self._buckets) > _MAX_IDLE_BUCKETS:
            self._drop_full_buckets(now)
        bucket = self._buckets.setdefault(tenant, _Bucket(tokens=float(self._burst), stamp=now))
        bucket.tokens = min(float(self._burst), bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            raise TooManyRequestsError(
                f"too many serving requests per second for this tenant (limit {self._rate:g}/s, bursts of "
                f"{self._burst}, TUNEFORGE_TENANT_REQUESTS_PER_SECOND); slow down",
                retry_after=math.ceil((1 - bucket.tokens) / self._rate),
            )
        bucket.tokens -= 1

    def _drop_full_buckets(self, now: float) -> None:
        for tenant, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.stamp) * self._rate >= self._burst:
                del self._buckets[tenant]

    def _release(self, tenant: str) -> None:
        with self._lock:
            left = self._waiting.get(tenant, 0) - 1
            if left > 0:
                self._waiting[tenant] = left
            else:
                self._waiting.pop(tenant, None)
