"""Nothing accepted is lost, nothing is retried forever: validation on real `tuneforge.validate` workers.

A dataset left `validating` (a crash, a broker that was down) is sent by the sweeper and validated;
one whose validations kept ending without a verdict ends `errored` after the attempt cap; one that
needs more memory, or more time, than a validation may take ends `errored` while the worker lives on.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from app.context import AppContext
from app.db import Dataset, DatasetStatus
from app.db.base import utcnow
from app.db.session import transaction
from app.main import create_app
from app.services import auth
from app.services.dataset_files import validation as dataset_validation
from app.storage import LocalBlobStore

STACKS = ["embedded", "postgres_s3"]


def _orphan(settings: Any, name: str, data: bytes | None, **fields: Any) -> None:
    """What a crash between "upload registered" and "verdict recorded" leaves behind.

    With `data` None the blob is a FIFO nobody writes to (local store only): reading it hangs.
    """
    ctx = AppContext.from_settings(settings)
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, "crashed", "carol")
        key = f"tenants/{user.tenant.uuid}/datasets/{name}/data.csv"
        if data is None:
            assert isinstance(ctx.store, LocalBlobStore)
            (ctx.store.root / key).parent.mkdir(parents=True)
            os.mkfifo(ctx.store.root / key)
        else:
            ctx.store.put_stream(key, [data])
        session.add(Dataset(tenant_id=user.tenant_id, name=name, file_name="data.csv", blob_key=key,
                            status=DatasetStatus.VALIDATING, mime_type="text/csv", **fields))  # fmt: skip
    ctx.close()


def _verdict(client: TestClient, name: str, timeout: float = 60) -> Dataset:
    deadline = time.monotonic() + timeout
    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        while True:
            row = session.query(Dataset).filter_by(name=name).one()
            if row.status != DatasetStatus.VALIDATING or time.monotonic() > deadline:
                return row
            session.expire_all()
            time.sleep(0.1)


@pytest.mark.parametrize("stack", STACKS)
def test_dataset_left_validating_is_validated_on_next_start(
    stack: str, stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any]
) -> None:
    settings = stack_settings_factory(stack)
    validate_worker_for(settings)
    _orphan(settings, "orphan", b"prompt,completion\nq,a\n")
    with TestClient(create_app(settings)) as client:
        row = _verdict(client, "orphan")
    assert row.status == DatasetStatus.CONNECTED and row.row_count == 1
    assert row.validation_attempts == 1 and row.validation_enqueued_at is not None


@pytest.mark.parametrize("stack", STACKS)
def test_validation_that_never_finished_n_times_ends_errored_instead_of_running_again(
    stack: str, stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any]
) -> None:
    settings = stack_settings_factory(stack)
    validate_worker_for(settings)
    # Three attempts that started and never recorded a verdict (worker killed each time).
    cap = settings.validation_max_attempts
    _orphan(settings, "cursed", b"prompt,completion\nq,a\n", validation_attempts=cap)
    with TestClient(create_app(settings)) as client:
        row = _verdict(client, "cursed")
    assert row.status == DatasetStatus.ERRORED
    assert f"started {cap} times and never finished" in (row.last_error or "")
    assert row.validation_attempts == cap + 1


def test_sweeper_sends_unsent_and_abandoned_validations_but_not_running_ones(
    stack_settings_factory: Callable[..., Any],
) -> None:
    settings = stack_settings_factory("embedded", validate_queue="tuneforge.validate.nobody-consumes")
    now = utcnow()
    long_ago = now - timedelta(seconds=dataset_validation.hard_time_limit(settings) + 120)
    _orphan(settings, "never-sent", b"x", created_at=now - timedelta(seconds=30))
    _orphan(settings, "abandoned", b"x", validation_enqueued_at=long_ago, updated_at=long_ago)
    _orphan(settings, "running", b"x", validation_enqueued_at=long_ago, updated_at=now)
    _orphan(settings, "just-sent", b"x", validation_enqueued_at=now, updated_at=now)
    fresh = utcnow().replace(tzinfo=None)
    ctx = AppContext.from_settings(settings)
    try:
        assert dataset_validation.sweep(ctx) == 2
        with ctx.sessions() as session:
            sent = {d.name: d.validation_enqueued_at for d in session.query(Dataset)}
    finally:
        ctx.close()
    # SQLite hands back naive datetimes (UTC), PostgreSQL aware ones.
    resent = {name for name, at in sent.items() if at is not None and at.replace(tzinfo=None) > fresh}
    assert resent == {"never-sent", "abandoned"}
    assert sent["running"] is not None and sent["running"].replace(tzinfo=None) == long_ago.replace(
        tzinfo=None
    )


def test_a_validation_that_hangs_is_stopped_at_its_time_limit(
    stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any]
) -> None:
    settings = stack_settings_factory("embedded", validation_time_limit_seconds=5)
    validate_worker_for(settings)
    _orphan(settings, "stuck", None)
    started = time.monotonic()
    with TestClient(create_app(settings)) as client:
        row = _verdict(client, "stuck", timeout=60)
    assert row.status == DatasetStatus.ERRORED
    assert "ran past its time limit of 5 s" in (row.last_error or "")
    assert time.monotonic() - started < 30  # the soft limit, not the sweeper's re-send or the hard kill


def _parquet_bomb(rows: int = 64, row_bytes: int = 4 * 1024 * 1024) -> bytes:
    """A few hundred bytes on disk, rows * row_bytes of text once read (one dictionary entry, repeated)."""
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["x" * row_bytes]))
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"text": column}), buffer, compression="zstd", dictionary_pagesize_limit=row_bytes * 2
    )
    return buffer.getvalue()


def test_validation_past_its_memory_cap_ends_errored_and_the_worker_lives_on(
    stack_settings_factory: Callable[..., Any], validate_worker_for: Callable[[Any], Any], new_tenant_on: Any
) -> None:
    settings = stack_settings_factory("embedded", validation_memory_bytes=64 * 1024**2)
    validate_worker_for(settings)
    bomb = _parquet_bomb()
    assert len(bomb) < 64 * 1024
    with TestClient(create_app(settings)) as client:
        tenant = new_tenant_on(client)
        body = tenant.upload_dataset("bomb", "bomb.parquet", bomb)
        assert body["status"] == "errored", body
        assert "more than 67108864 bytes of memory" in body["lastError"]
        assert tenant.upload_dataset("fine", "fine.csv", b"prompt,completion\nq,a\n")["status"] == "connected"
