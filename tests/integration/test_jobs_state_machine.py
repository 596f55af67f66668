"""The job state machine on the real PostgreSQL and on SQLite: transitions, cancel, metrics, checkpoints."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import product

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import AdapterVersion, FinetuningJob, JobEvent, JobEventKind, JobMetric, JobStatus, migrate
from app.db.base import utcnow
from app.db.session import make_engine, make_session_factory
from app.errors import ConflictError
from app.services import auth, jobs, repos

S = JobStatus
LEASE = 30.0
# The shortest legal path from a fresh (queued) job to each status.
PATH_TO = {
    S.QUEUED: [],
    S.TRAINING: [S.TRAINING],
    S.STOPPING: [S.TRAINING, S.STOPPING],
    S.COMPLETED: [S.TRAINING, S.COMPLETED],
    S.ERRORED: [S.TRAINING, S.ERRORED],
    S.CANCELED: [S.CANCELED],
}
LEGAL = [(a, b) for a, targets in jobs.TRANSITIONS.items() for b in targets]
ILLEGAL = [(a, b) for a, b in product(S, S) if b not in jobs.TRANSITIONS[a]]


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sessionmaker]:
    if request.param == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('jobs') / 'jobs.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(factory: sessionmaker) -> Iterator[Session]:
    with factory() as session:
        yield session


def _new_job(session: Session) -> FinetuningJob:
    """A committed queued job and its queued version, in a tenant of its own."""
    user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
    repo = repos.create(session, user, "demo", None, exists_ok=False)
    version = AdapterVersion(
        repo_id=repo.id, created_by_id=user.id, tag=repos.allocate_tag(session, repo), base_model="tiny"
    )
    session.add(version)
    session.flush()
    job = FinetuningJob(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        repo_id=repo.id,
        version_id=version.id,
        base_model="tiny",
        adapter_type="lora",
        params={"train_steps": 10},
    )
    session.add(job)
    session.commit()
    return job


def _walk(session: Session, job: FinetuningJob, status: JobStatus) -> None:
    for step in PATH_TO[status]:
        jobs.transition(session, job, step)
    session.commit()


@pytest.mark.parametrize(("start", "target"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transition_moves_job_and_version(session: Session, start: S, target: S) -> None:
    job = _new_job(session)
    _walk(session, job, start)
    jobs.transition(session, job, target, error="boom" if target == S.ERRORED else None)
    session.commit()
    session.expire_all()
    assert job.status == target
    assert job.version.status == target
    if target == S.ERRORED:
        assert job.error == job.version.error == "boom"
    assert (job.finished_at is not None) == (target in jobs.FINAL_STATUSES)


@pytest.mark.parametrize(("start", "target"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transition_is_refused_naming_both_states(session: Session, start: S, target: S) -> None:
    job = _new_job(session)
    _walk(session, job, start)
    with pytest.raises(ConflictError, match=f"from {start} to {target}"):
        jobs.transition(session, job, target)
    session.rollback()
    assert job.status == start
    assert job.version.status == start


def test_a_racing_writer_loses_with_the_real_state_named(factory: sessionmaker) -> None:
    with factory() as api, factory() as worker:
        job = _new_job(api)
        stale = worker.get(FinetuningJob, job.id)
        assert stale is not None and stale.status == S.QUEUED
        jobs.request_cancel(api, job)
        api.commit()
        with pytest.raises(ConflictError, match="from canceled to training"):
            jobs.transition(worker, stale, S.TRAINING)


def test_training_stamps_started_at_and_finishing_stamps_finished_at(session: Session) -> None:
    job = _new_job(session)
    assert job.started_at is None and job.finished_at is None
    jobs.transition(session, job, S.TRAINING)
    assert job.started_at is not None and job.finished_at is None
    jobs.transition(session, job, S.COMPLETED)
    session.commit()
    session.expire_all()
    assert job.started_at is not None and job.finished_at is not None
    assert job.finished_at >= job.started_at


def test_cancel_of_a_queued_job_is_immediate(session: Session) -> None:
    job = _new_job(session)
    jobs.request_cancel(session, job)
    session.commit()
    assert job.status == job.version.status == S.CANCELED
    assert job.finished_at is not None


def test_cancel_of_a_training_job_asks_it_to_stop(session: Session) -> None:
    job = _new_job(session)
    _walk(session, job, S.TRAINING)
    jobs.request_cancel(session, job)
    jobs.request_cancel(session, job)  # a second click while stopping is harmless
    session.commit()
    assert job.status == job.version.status == S.STOPPING
    assert job.cancel_requested_at is not None and job.finished_at is None


@pytest.mark.parametrize("final", sorted(jobs.FINAL_STATUSES))
def test_cancel_of_a_finished_job_is_a_409(session: Session, final: S) -> None:
    job = _new_job(session)
    _walk(session, job, final)
    with pytest.raises(ConflictError, match=f"job already {final}") as caught:
        jobs.request_cancel(session, job)
    assert caught.value.status_code == 409


def _expire_lease(session: Session, job: FinetuningJob) -> None:
    job.heartbeat_at = utcnow() - timedelta(seconds=LEASE + 1)
    session.flush()


def test_redelivery_after_the_lease_expired_keeps_training_and_records_a_restart(session: Session) -> None:
    job = _new_job(session)
    assert jobs.start_attempt(session, job, worker_id="w1", lease_seconds=LEASE) is False
    jobs.record_checkpoint(session, job, 40, "ckpt/40", {})
    _expire_lease(session, job)
    assert jobs.start_attempt(session, job, worker_id="w2", lease_seconds=LEASE) is True
    session.commit()
    assert (job.status, job.attempt, job.worker_id) == (S.TRAINING, 2, "w2")
    restart = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.kind == JobEventKind.RESTART)
    ).one()
    assert restart.data == {"attempt": 2, "previous_worker": "w1", "resume_step": 40}
    jobs.transition(session, job, S.COMPLETED)
    with pytest.raises(ConflictError, match="job already completed"):
        jobs.start_attempt(session, job, worker_id="w3", lease_seconds=LEASE)


def test_a_duplicate_delivery_while_the_lease_is_live_is_refused(session: Session) -> None:
    job = _new_job(session)
    jobs.start_attempt(session, job, worker_id="w1", lease_seconds=LEASE)
    session.commit()
    with pytest.raises(ConflictError, match="held by w1"):
        jobs.start_attempt(session, job, worker_id="w2", lease_seconds=LEASE)
    assert (job.worker_id, job.attempt) == ("w1", 1)


def test_heartbeat_renews_only_the_holders_lease(session: Session) -> None:
    job = _new_job(session)
    jobs.start_attempt(session, job, worker_id="w1", lease_seconds=LEASE)
    _expire_lease(session, job)
    session.commit()
    assert jobs.heartbeat(session, job.id, "w2") is False
    assert jobs.heartbeat(session, job.id, "w1") is True
    session.commit()
    session.refresh(job)
    assert job.heartbeat_at is not None and utcnow() - _aware(job.heartbeat_at) < timedelta(seconds=5)


def test_orphaned_finds_running_jobs_with_a_stale_lease_not_yet_resent(session: Session) -> None:
    alive, lost, resent = _new_job(session), _new_job(session), _new_job(session)
    for job in (alive, lost, resent):
        jobs.start_attempt(session, job, worker_id="w", lease_seconds=LEASE)
    _expire_lease(session, lost)
    _expire_lease(session, resent)
    jobs.mark_enqueued(session, resent)  # the sweeper already sent it again a moment ago
    cutoff = utcnow() - timedelta(seconds=LEASE)
    assert [j.id for j in jobs.orphaned(session, cutoff)] == [lost.id]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_metric_re_report_updates_the_step_instead_of_duplicating(session: Session) -> None:
    job = _new_job(session)
    jobs.record_metric(session, job, 5, train_loss=2.0, learning_rate=1e-4, epoch=0.5)
    jobs.record_metric(session, job, 5, eval_loss=2.5)  # the eval report merges into the step
    jobs.record_metric(session, job, 5, train_loss=1.5)  # redelivered job reports the step again
    session.commit()
    rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job.id)).all()
    assert [(r.step, r.train_loss, r.eval_loss, r.learning_rate) for r in rows] == [(5, 1.5, 2.5, 1e-4)]
    assert job.steps_done == 5
    with pytest.raises(TypeError, match="loss"):
        jobs.record_metric(session, job, 6, loss=1.0)


def test_run_metrics_are_stored_with_the_step_and_eval_ones_merge_in(session: Session) -> None:
    job = _new_job(session)
    big = 3 * 2**40  # past 32 bits: byte counts and token totals need BigInteger on both databases
    jobs.record_metric(
        session,
        job,
        7,
        grad_norm=0.75,
        tokens_per_second=1234.5,
        useful_tokens=big,
        peak_rss_bytes=big + 1,
        cuda_allocated_bytes=big + 2,
        gpu_utilization=97.0,
    )
    jobs.record_metric(session, job, 7, eval_loss=2.0, eval_perplexity=7.389)
    session.commit()
    session.expire_all()
    row = session.scalars(select(JobMetric).where(JobMetric.job_id == job.id)).one()
    assert (row.grad_norm, row.tokens_per_second, row.gpu_utilization) == (0.75, 1234.5, 97.0)
    assert (row.useful_tokens, row.peak_rss_bytes, row.cuda_allocated_bytes) == (big, big + 1, big + 2)
    assert (row.eval_loss, row.eval_perplexity) == (2.0, 7.389)


def test_checkpoint_is_idempotent_per_step_and_latest_is_the_highest(session: Session) -> None:
    job = _new_job(session)
    assert jobs.latest_checkpoint(session, job) is None
    jobs.record_checkpoint(session, job, 10, "ckpt/10", {"a": {"size": 1, "sha256": "x"}})
    jobs.record_checkpoint(session, job, 20, "ckpt/20", {})
    again = jobs.record_checkpoint(session, job, 10, "ckpt/10b", {"a": {"size": 2, "sha256": "y"}})
    session.commit()
    assert again.prefix == "ckpt/10b" and again.files == {"a": {"size": 2, "sha256": "y"}}
    count = select(func.count()).where(jobs.JobCheckpoint.job_id == job.id)
    assert session.scalar(count) == 2
    latest = jobs.latest_checkpoint(session, job)
    assert latest is not None and (latest.step, latest.prefix) == (20, "ckpt/20")


def test_prune_keeps_the_newest_checkpoints_and_returns_the_prefixes_of_the_rest(session: Session) -> None:
    job, neighbour = _new_job(session), _new_job(session)
    for step in (30, 10, 50, 20, 40):
        jobs.record_checkpoint(session, job, step, f"ckpt/{step}/", {})
    jobs.record_checkpoint(session, neighbour, 10, "other/10/", {})
    session.commit()
    assert sorted(jobs.prune_checkpoints(session, job, 2)) == ["ckpt/10/", "ckpt/20/", "ckpt/30/"]
    session.commit()
    assert jobs.checkpoint_steps(session, job) == [40, 50]
    assert jobs.checkpoint_steps(session, neighbour) == [10]  # another job's checkpoints are untouched
    assert jobs.prune_checkpoints(session, job, 2) == []  # nothing left to prune
    with pytest.raises(ValueError, match="keep"):
        jobs.prune_checkpoints(session, job, 0)


def test_timeline_has_the_first_entry_into_each_status(session: Session) -> None:
    job = _new_job(session)
    _walk(session, job, S.STOPPING)
    jobs.transition(session, job, S.CANCELED)
    session.commit()
    timeline = jobs.timeline(session, job)
    assert list(timeline) == ["queued", "training", "stopping", "canceled"]
    moments = [datetime.fromisoformat(entry["startedAt"]) for entry in timeline.values()]
    assert all(m.tzinfo is not None for m in moments)
    assert moments == sorted(moments)


def test_sweeper_finds_only_queued_jobs_whose_enqueue_was_lost(session: Session) -> None:
    lost, enqueued, started = _new_job(session), _new_job(session), _new_job(session)
    jobs.mark_enqueued(session, enqueued)
    _walk(session, started, S.TRAINING)
    later = utcnow() + timedelta(seconds=1)
    found = {j.id for j in jobs.queued_unenqueued(session, later)}
    assert lost.id in found
    assert not found & {enqueued.id, started.id}
    assert lost.id not in {j.id for j in jobs.queued_unenqueued(session, utcnow() - timedelta(hours=1))}


def test_a_redelivery_past_the_attempt_cap_ends_the_job_errored_instead_of_resuming_it(
    session: Session,
) -> None:
    job = _new_job(session)
    jobs.start_attempt(session, job, worker_id="w1", lease_seconds=LEASE, max_attempts=2)
    _expire_lease(session, job)
    assert jobs.start_attempt(session, job, worker_id="w2", lease_seconds=LEASE, max_attempts=2) is True
    _expire_lease(session, job)
    session.commit()

    with pytest.raises(jobs.AttemptsExhaustedError, match=r"worker lost 2 times \(out of memory\?\)"):
        jobs.start_attempt(session, job, worker_id="w3", lease_seconds=LEASE, max_attempts=2)
    session.commit()

    session.refresh(job)
    assert (job.status, job.attempt, job.error) == (S.ERRORED, 2, "worker lost 2 times (out of memory?)")
    assert job.version.status == S.ERRORED and job.finished_at is not None


def test_the_attempt_cap_spares_a_live_lease_and_a_job_below_the_cap(session: Session) -> None:
    held, fresh = _new_job(session), _new_job(session)
    jobs.start_attempt(session, held, worker_id="w1", lease_seconds=LEASE, max_attempts=1)
    session.commit()
    with pytest.raises(ConflictError, match="held by w1"):  # a duplicate delivery, not a lost worker
        jobs.start_attempt(session, held, worker_id="w2", lease_seconds=LEASE, max_attempts=1)
    assert held.status == S.TRAINING
    jobs.start_attempt(session, fresh, worker_id="w1", lease_seconds=LEASE, max_attempts=2)
    _expire_lease(session, fresh)
    assert jobs.lost_too_often(fresh, 2) is False and jobs.lost_too_often(fresh, 1) is True
