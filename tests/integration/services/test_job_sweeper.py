"""The sweeper on the embedded stack: orphans re-sent, or given up once their worker was lost too often."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from app.context import AppContext
from app.db import AdapterVersion, FinetuningJob, JobStatus
from app.db.base import utcnow
from app.services import auth, jobs, repos
from app.services.job_sweeper import sweep

LEASE = 30.0


@pytest.fixture
def ctx(stack_settings_factory: Callable[..., Any]) -> Iterator[AppContext]:
    context = AppContext.from_settings(
        stack_settings_factory("embedded", job_lease_seconds=LEASE, job_max_attempts=2)
    )
    yield context
    context.close()


def _orphan(ctx: AppContext, attempts: int) -> int:
    """A training job whose worker was lost on its `attempts`-th delivery (lease expired, not re-sent)."""
    with ctx.sessions() as session:
        user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
        repo = repos.create(session, user, "r", None, exists_ok=False)
        version = AdapterVersion(repo_id=repo.id, tag=repos.allocate_tag(session, repo), base_model="tiny")
        session.add(version)
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
        for n in range(attempts):
            jobs.start_attempt(session, job, worker_id=f"w{n}", lease_seconds=LEASE)
            job.heartbeat_at = utcnow() - timedelta(seconds=LEASE + 1)
            session.flush()
        session.commit()
        return job.id


def _job(ctx: AppContext, job_id: int) -> FinetuningJob:
    with ctx.sessions() as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None
        return job


def test_an_orphan_under_the_cap_is_re_sent_and_one_at_the_cap_is_ended_errored(ctx: AppContext) -> None:
    resumable, exhausted = _orphan(ctx, attempts=1), _orphan(ctx, attempts=2)

    sweep(ctx)

    assert _job(ctx, resumable).enqueued_at is not None and _job(ctx, resumable).status == JobStatus.TRAINING
    given_up = _job(ctx, exhausted)
    assert (given_up.status, given_up.error) == (JobStatus.ERRORED, "worker lost 2 times (out of memory?)")
    assert given_up.enqueued_at is None


def test_leases_are_not_judged_until_the_database_has_been_reachable_for_a_lease(ctx: AppContext) -> None:
    orphan = _orphan(ctx, attempts=1)
    sweep(ctx, judge_leases=False)
    assert _job(ctx, orphan).enqueued_at is None
    sweep(ctx)
    assert _job(ctx, orphan).enqueued_at is not None
