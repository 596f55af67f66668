"""Garbage collection on the embedded stack (SQLite + local directory): what is live, what is old enough."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from app.context import AppContext
from app.db import AdapterVersion, Dataset, FinetuningJob, JobCheckpoint
from app.services import auth, gc, repos
from app.storage import LocalBlobStore

DAY = timedelta(days=1)


@pytest.fixture
def ctx(stack_settings_factory: Callable[..., Any]) -> Iterator[AppContext]:
    context = AppContext.from_settings(stack_settings_factory("embedded", gc_min_age_seconds=86400))
    yield context
    context.close()


def _put(ctx: AppContext, key: str, size: int = 10, *, age: timedelta = 2 * DAY) -> str:
    ctx.store.put_stream(key, [b"x" * size])
    assert isinstance(ctx.store, LocalBlobStore)
    path = ctx.store.root / key
    moment = path.stat().st_mtime - age.total_seconds()
    os.utime(path, (moment, moment))
    return key


def test_only_unreferenced_owners_older_than_the_minimum_age_are_removed(ctx: AppContext) -> None:
    with ctx.sessions() as session:
        user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
        t = f"tenants/{user.tenant.uuid}"
        repo = repos.create(session, user, "r", None, exists_ok=False)
        version = AdapterVersion(
            repo_id=repo.id, tag=1, base_model="tiny", artifact_prefix=f"{t}/repos/{repo.uuid}/versions/v/"
        )
        session.add_all(
            [
                Dataset(
                    tenant_id=user.tenant_id,
                    name="d",
                    file_name="d.jsonl",
                    blob_key=f"{t}/datasets/u1/data.jsonl",
                ),
                version,
            ]
        )
        session.flush()
        job = FinetuningJob(
            tenant_id=user.tenant_id,
            repo_id=repo.id,
            version_id=version.id,
            base_model="tiny",
            adapter_type="lora",
        )
        session.add(job)
        session.flush()
        session.add(JobCheckpoint(job_id=job.id, step=4, prefix=f"{t}/jobs/{job.uuid}/checkpoints/step-4/"))
        session.commit()
        live = {
            _put(ctx, f"{t}/datasets/u1/data.jsonl"),
            _put(ctx, f"{t}/datasets/u1/tokenized/k.safetensors"),
            _put(ctx, f"{t}/repos/{repo.uuid}/versions/v/adapter_model.safetensors"),
            _put(ctx, f"{t}/jobs/{job.uuid}/checkpoints/step-4/trainer/state.json"),
            _put(ctx, f"{t}/unknown-kind/x"),  # outside the layout: never judged
        }
        pruned = _put(ctx, f"{t}/jobs/{job.uuid}/checkpoints/step-2/adapter_model.safetensors", 100)
        abandoned = _put(ctx, f"{t}/datasets/u2/data.jsonl", 1000)
        # An upload still arriving: one part is old, the other fresh, so the owner is kept whole.
        fresh = {
            _put(ctx, f"{t}/staging/adapters/s/adapter_config.json"),
            _put(ctx, f"{t}/staging/adapters/s/w", age=timedelta(0)),
        }

        dry = gc.collect(ctx.store, session, min_age=DAY, dry_run=True)
        assert [o.prefix for o in dry.removable] == [
            f"{t}/datasets/u2/",
            f"{t}/jobs/{job.uuid}/checkpoints/step-2/",
        ]
        assert (dry.freed_bytes, dry.freed_blobs) == (1100, 2)
        assert [o.prefix for o in dry.too_recent] == [f"{t}/staging/adapters/s/"]
        assert set(ctx.store.list_keys(t)) == live | fresh | {pruned, abandoned}

        report = gc.collect(ctx.store, session, min_age=DAY, dry_run=False)

    assert report.freed_bytes == 1100
    assert set(ctx.store.list_keys(t)) == live | fresh
