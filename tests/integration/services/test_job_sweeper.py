"""The sweeper on the embedded stack: orphans re-sent, or given up once their worker was lost too often."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from kombu import Connection

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


def _orphan(ctx: AppContext, attempts: int, worker_class: str | None = None) -> int:
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
            worker_class=worker_class,
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


def test_a_job_is_re_sent_to_the_queue_of_its_recorded_worker_class(
    stack_settings_factory: Callable[..., Any],
) -> None:
    classes = [{"name": "small", "memory_gib": 8}, {"name": "big", "memory_gib": 80}]
    settings = stack_settings_factory("embedded", job_lease_seconds=LEASE, worker_classes=classes)
    context = AppContext.from_settings(settings)
    try:
        orphan = _orphan(context, attempts=1, worker_class="big")
        sweep(context)
        assert _job(context, orphan).enqueued_at is not None
        with Connection(settings.broker_url) as connection:
            for queue, expected in ((settings.train_queue, None), (f"{settings.train_queue}.big", orphan)):
                with connection.SimpleQueue(queue) as messages:
                    try:
                        message = messages.get(timeout=2)
                    except messages.Empty:
                        assert expected is None, f"nothing on {queue}"
                        continue
                    message.ack()
                    assert message.headers["task"] == "tuneforge.train" and message.payload[0] == [expected]
    finally:
        context.close()
