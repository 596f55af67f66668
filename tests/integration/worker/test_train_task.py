"""`tuneforge.train` on a real Celery worker over the real Redis: a job trains to a stored adapter."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import select
from sqlalchemy.orm import Session
from tests_support import children_running

from app.context import AppContext
from app.db import (
    AdapterVersion,
    Dataset,
    DatasetStatus,
    FinetuningJob,
    JobCheckpoint,
    JobEvent,
    JobMetric,
    JobStatus,
    Repo,
)
from app.db.jobs import JobEventKind
from app.db.session import transaction
from app.services import auth, jobs, repos
from worker.celery_app import make_celery
from worker.tasks import TRAIN_TASK, register_tasks, run_job

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
JOB_TIMEOUT_SECONDS = 120
ROWS = [{"prompt": f"Say the number {n}.", "completion": f" {n}"} for n in range(12)]


@pytest.fixture(scope="module")
def ctx(stack_settings_factory: Any) -> Iterator[AppContext]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} for the worker tests: {exc}")
    context = AppContext.from_settings(stack_settings_factory("embedded", broker_url=REDIS_URL))
    yield context
    context.close()


@pytest.fixture(scope="module")
def celery(ctx: AppContext) -> Iterator[Celery]:
    """A real worker thread; a queue of this run's own keeps parallel runs on the shared Redis apart."""
    app = make_celery(ctx.settings)
    app.conf.task_default_queue = f"tuneforge.train.test-{secrets.token_hex(4)}"
    register_tasks(app, ctx)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        yield app


def _dataset(ctx: AppContext, session: Session, user: Any, name: str, rows: list[dict[str, str]]) -> Dataset:
    """A connected prompt/completion dataset of `rows`, its bytes in the store."""
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    key = f"tenants/{user.tenant.uuid}/datasets/{secrets.token_hex(8)}/data.jsonl"
    info = ctx.store.put_stream(key, [data])
    dataset = Dataset(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        name=name,
        status=DatasetStatus.CONNECTED,
        file_name=f"{name}.jsonl",
        blob_key=key,
        size_bytes=info.size,
        sha256=info.sha256,
        format="prompt_completion",
        row_count=len(rows),
    )
    session.add(dataset)
    session.flush()
    return dataset


def _queued_job(ctx: AppContext, held_out: list[dict[str, str]] | None = None, **params: Any) -> int:
    """A committed queued job on a connected prompt/completion dataset, in a tenant of its own;
    `held_out`: the rows of a second dataset it evaluates on (OpenAI's validation_file)."""
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
        dataset = _dataset(ctx, session, user, "numbers", ROWS)
        evaluation = _dataset(ctx, session, user, "held-out", held_out) if held_out is not None else None
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, user.tenant.name, "alice")
        repo = repos.create(session, user, "numbers", None, exists_ok=True)
    with transaction(ctx.sessions) as session:
        config = {
            "base_model": "tiny-random-llama",
            "train_steps": 4,
            "checkpoint_every_n_steps": 2,
            "micro_batch_size": 2,
            "effective_batch_size": 2,
            **params,
        }
        job_id = _add_job(session, repo, user.tenant_id, user.id, dataset.id, config)
        if evaluation is not None:
            job = session.get(FinetuningJob, job_id)
            assert job is not None
            job.eval_dataset_id, job.eval_dataset_name = evaluation.id, evaluation.name
        return job_id


def _add_job(
    session: Session,
    repo: Repo,
    tenant_id: int,
    user_id: int | None,
    dataset_id: int | None,
    config: dict[str, Any],
    parent_version_id: int | None = None,
) -> int:
    """A queued job and its version in `repo`, trained with `config`; returns the job's id."""
    version = AdapterVersion(
        repo_id=repo.id,
        created_by_id=user_id,
        tag=repos.allocate_tag(session, repo),
        base_model=config["base_model"],
        config=config,
        parent_version_id=parent_version_id,
    )
    session.add(version)
    session.flush()
    job = FinetuningJob(
        tenant_id=tenant_id,
        created_by_id=user_id,
        repo_id=repo.id,
        version_id=version.id,
        dataset_id=dataset_id,
        base_model=config["base_model"],
        adapter_type="lora",
        params=config,
    )
    session.add(job)
    session.flush()
    return job.id


def _wait_until_final(ctx: AppContext, job_id: int) -> FinetuningJob:
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        with ctx.sessions() as session:
            job = session.get(FinetuningJob, job_id)
            assert job is not None
            if job.status in jobs.FINAL_STATUSES:
                session.expunge(job)
                return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish within {JOB_TIMEOUT_SECONDS}s")


def test_train_task_completes_version_with_verified_adapter_metrics_and_checkpoints(
    ctx: AppContext, celery: Celery
) -> None:
    job_id = _queued_job(ctx)

    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)

    assert job.status == JobStatus.COMPLETED, job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None
        assert version.status == JobStatus.COMPLETED
        assert set(version.artifact_files) == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "training_summary.json",
        }
        assert version.artifact_prefix is not None
        for name, meta in version.artifact_files.items():
            stored = ctx.store.read_bytes(f"{version.artifact_prefix}{name}")
            assert meta["sha256"] == hashlib.sha256(stored).hexdigest()
            assert meta["size"] == len(stored)
        adapter_config = json.loads(ctx.store.read_bytes(f"{version.artifact_prefix}adapter_config.json"))
        assert adapter_config["base_model_name_or_path"] == "tiny-random-llama"
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)).all()
        assert sorted(m.step for m in metrics) == [1, 2, 3, 4]
        assert all(m.train_loss is not None for m in metrics)
        assert all(m.tokens_per_second and m.useful_tokens and m.peak_rss_bytes for m in metrics)
        assert all(m.grad_norm is not None for m in metrics)
        assert metrics[-1].eval_loss is not None and metrics[-1].eval_perplexity is not None
        # The config actually used, with the defaults the worker resolved, replaces the requested one.
        assert version.config["max_seq_length"] == 2048 and version.config["dtype"] in ("bf16", "fp32")
        assert version.config["target_modules"][0] == "q_proj"
        assert "exact match" in version.quality_report["summary"]
        assert version.metrics_summary["useful_tokens"] > 0
        # Tokenised once per (dataset, tokenizer, settings), kept in the dataset's directory.
        dataset = session.get(Dataset, job.dataset_id)
        assert dataset is not None
        assert len(ctx.store.list_keys(dataset.blob_key.rsplit("/", 1)[0] + "/tokenized/")) == 1
        checkpoints = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).all()
        assert sorted(c.step for c in checkpoints) == [2, 4]
        for checkpoint in checkpoints:
            assert "trainer/state.json" in checkpoint.files
            assert ctx.store.exists(f"{checkpoint.prefix}adapter_model.safetensors")


def test_train_task_with_unknown_base_model_errors_naming_the_available_models(
    ctx: AppContext, celery: Celery
) -> None:
    job_id = _queued_job(ctx, base_model="no-such-model")

    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)

    assert job.status == JobStatus.ERRORED
    assert job.error is not None
    assert "no-such-model" in job.error
    assert "tiny-random-llama" in job.error and "smollm2-135m" in job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None
        assert version.status == JobStatus.ERRORED and version.error == job.error


def _child_job(ctx: AppContext, parent_job_id: int, **params: Any) -> int:
    """A queued job continuing from the completed version of `parent_job_id`, in the same repo."""
    with transaction(ctx.sessions) as session:
        parent = session.get(FinetuningJob, parent_job_id)
        assert parent is not None
        config = dict(parent.version.config) | params
        return _add_job(
            session,
            parent.version.repo,
            parent.tenant_id,
            parent.created_by_id,
            parent.dataset_id,
            config,
            parent_version_id=parent.version_id,
        )


def _run_to_completion(ctx: AppContext, celery: Celery, job_id: int) -> FinetuningJob:
    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)
    assert job.status == JobStatus.COMPLETED, job.error
    return job


def test_a_job_continuing_from_a_version_starts_from_its_weights(ctx: AppContext, celery: Celery) -> None:
    parent = _run_to_completion(ctx, celery, _queued_job(ctx, learning_rate=1e-2, dtype="fp32"))
    child = _run_to_completion(ctx, celery, _child_job(ctx, parent.id, train_steps=2))
    with ctx.sessions() as session:
        parent_version = session.get(AdapterVersion, parent.version_id)
        child_version = session.get(AdapterVersion, child.version_id)
        assert parent_version is not None and child_version is not None
        # The child's run began where the parent's ended, not at the base model.
        before = child_version.metrics_summary["eval_loss_before"]
        assert before == pytest.approx(parent_version.metrics_summary["eval_loss_after"], rel=1e-5)
        assert child_version.metrics_summary["steps"] == 2
        assert child_version.config["rank"] == parent_version.config["rank"]


def test_a_turbo_job_on_a_lora_version_stores_heads_beside_the_unchanged_lora(
    ctx: AppContext, celery: Celery
) -> None:
    parent = _run_to_completion(ctx, celery, _queued_job(ctx, dtype="fp32"))
    child_id = _child_job(
        ctx, parent.id, adapter="turbo", learning_rate=1e-3, train_steps=2, speculator_heads=3,
        speculator_train_steps=2,
    )  # fmt: skip
    child = _run_to_completion(ctx, celery, child_id)
    with ctx.sessions() as session:
        parent_version = session.get(AdapterVersion, parent.version_id)
        child_version = session.get(AdapterVersion, child.version_id)
        assert parent_version is not None and child_version is not None
        assert set(child_version.artifact_files) == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "speculator.safetensors",
            "speculator_config.json",
            "training_summary.json",
        }
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert child_version.artifact_files[name] == parent_version.artifact_files[name]
        summary = child_version.metrics_summary
        assert summary["adapter_type"] == "turbo" and len(summary["speculator"]["head_top1_accuracy"]) == 3
        # The speedup the serving engine measured on held-out prompts: the LoRA with and without the heads.
        measured = summary["speculator"]["measured"]
        assert measured["prompts"] >= 1 and measured["speedup"] > 0
        assert measured["identical_outputs"] == measured["prompts"]
        # The speculator phase shows in the job's timeline: when it began, and how it ended.
        assert summary["speculator"]["phase"]["steps"] == 2
        job = session.get(FinetuningJob, child_id)
        assert job is not None
        phase = jobs.timeline(session, job)["speculator-phase"]
        assert phase["startedAt"]
        assert "ended after 2 steps (reached speculator_train_steps (2))" in phase["detail"]


def test_automatic_layers_and_ranks_are_recorded_on_the_version(ctx: AppContext, celery: Celery) -> None:
    job_id = _queued_job(ctx, rank="auto", layer_selection_percentage=0.5, n_test_samples=4)
    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)
    assert job.status == JobStatus.COMPLETED, job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None
        decisions = version.autoconfig
        assert len(decisions["selected_layers"]) == 1 and len(decisions["layer_scores"]) == 2
        assert decisions["module_ranks"] and decisions["trainable_parameters"] > 0
        assert "lora_kwargs" not in decisions  # the summary keeps the decisions, not the plumbing
        assert version.config["rank"] == "auto"


def test_truncated_rows_are_kept_and_reported_as_a_job_event(ctx: AppContext, celery: Celery) -> None:
    job_id = _queued_job(ctx, max_seq_length=8, apply_chat_template=False, train_steps=1)
    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)
    assert job.status == JobStatus.COMPLETED, job.error
    with ctx.sessions() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == JobEventKind.TRUNCATION)
        ).all()
    [event] = events
    assert event.data["count"] == len(event.data["rows"]) > 0
    assert "longer than max_seq_length (8) and were truncated (kept)" in event.message


HELD_OUT = [
    {"prompt": f"Say the word {word}, and then say nothing more at all.", "completion": f" {word}"}
    for word in ("one", "two", "three")
]


def test_a_job_with_an_evaluation_dataset_trains_on_every_row_and_evaluates_on_its_rows(
    ctx: AppContext, celery: Celery
) -> None:
    # The truncation report counts the rows the run read, and numbers them: the training dataset's 12
    # (none held out), then the evaluation dataset's 3, each longer than 8 tokens.
    job_id = _queued_job(ctx, held_out=HELD_OUT, max_seq_length=8, apply_chat_template=False, train_steps=1)
    job = _run_to_completion(ctx, celery, job_id)
    with ctx.sessions() as session:
        [event] = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == JobEventKind.TRUNCATION)
        ).all()
        [metric] = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)).all()
    total = len(ROWS) + len(HELD_OUT)
    assert f" of {total} rows are longer than" in event.message
    assert {len(ROWS) + n for n in (1, 2, 3)} <= set(event.data["rows"])
    # One step of 2 rows is 2/12 of an epoch: all 12 training rows train (no share is held out of them).
    assert metric.epoch == pytest.approx(2 / len(ROWS))
    assert job.eval_dataset_name == "held-out"


def test_a_job_whose_evaluation_dataset_was_deleted_errors_saying_so(ctx: AppContext, celery: Celery) -> None:
    job_id = _queued_job(ctx, held_out=HELD_OUT, train_steps=1)
    with transaction(ctx.sessions) as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None
        session.delete(session.get(Dataset, job.eval_dataset_id))
    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)
    assert job.status == JobStatus.ERRORED
    assert job.error is not None and "validation dataset was deleted" in job.error


def _poison_adapter(ctx: AppContext, version_id: int) -> None:
    """One NaN in the stored lora_B of a completed version, recorded with its new sha256 (as an upload of
    such a file would be)."""
    from safetensors.torch import load, save

    with transaction(ctx.sessions) as session:
        version = session.get(AdapterVersion, version_id)
        assert version is not None and version.artifact_prefix is not None
        key = f"{version.artifact_prefix}adapter_model.safetensors"
        weights = load(b"".join(ctx.store.iter_chunks(key)))
        weights[next(k for k in sorted(weights) if "lora_B" in k)][0, 0] = float("nan")
        info = ctx.store.put_stream(key, [save(weights)])
        files = dict(version.artifact_files)
        files["adapter_model.safetensors"] = {"size": info.size, "sha256": info.sha256}
        version.artifact_files = files


def test_a_run_whose_weights_turn_non_finite_errors_and_publishes_nothing(
    ctx: AppContext, celery: Celery
) -> None:
    parent = _run_to_completion(ctx, celery, _queued_job(ctx, dtype="fp32"))
    _poison_adapter(ctx, parent.version_id)
    child_id = _child_job(ctx, parent.id, train_steps=2)

    celery.send_task(TRAIN_TASK, args=[child_id])
    job = _wait_until_final(ctx, child_id)

    assert job.status == JobStatus.ERRORED
    assert job.error is not None and "NaN or infinite weights" in job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None and version.status == JobStatus.ERRORED
        assert not version.artifact_files and version.artifact_prefix is None
        assert session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == child_id)).all() == []


def test_a_two_device_job_reports_each_step_once_from_rank_zero(
    ctx: AppContext, celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This worker lends a job two devices: two gloo processes on CPU, the task's process as rank 0.
    monkeypatch.setattr(ctx.settings, "worker_devices", 2)
    job_id = _queued_job(ctx, num_devices=2, micro_batch_size=1)

    celery.send_task(TRAIN_TASK, args=[job_id])
    job = _wait_until_final(ctx, job_id)

    assert job.status == JobStatus.COMPLETED, job.error
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, job.version_id)
        assert version is not None and "adapter_model.safetensors" in version.artifact_files
        assert version.metrics_summary["runtime"]["devices"] == 2
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)).all()
        assert sorted(m.step for m in metrics) == [1, 2, 3, 4]  # one writer: rank 0
        checkpoints = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).all()
        assert sorted(c.step for c in checkpoints) == [2, 4]


def test_a_job_whose_rank_dies_is_left_to_resume_from_its_checkpoint_like_a_lost_worker(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ctx.settings, "worker_devices", 2)
    job_id = _queued_job(ctx, num_devices=2, micro_batch_size=1, train_steps=30)

    def kill_rank_one_after_a_checkpoint() -> None:
        # As the OOM killer would: the other rank dies once the job has a checkpoint to resume from.
        deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with ctx.sessions() as session:
                checkpointed = session.scalars(
                    select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                ).first()
            ranks = children_running("worker.training.distributed")
            if checkpointed is not None and ranks:
                for rank in ranks:
                    os.kill(rank.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_one_after_a_checkpoint)
    killer.start()
    run_job(ctx, job_id, worker_id="worker-a/1")
    killer.join()
    with transaction(ctx.sessions) as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None and job.status == JobStatus.TRAINING and job.error is None
        job.heartbeat_at = job.heartbeat_at - timedelta(hours=1)  # its lease lapses, as the sweeper sees it

    run_job(ctx, job_id, worker_id="worker-b/1")  # the redelivery

    with ctx.sessions() as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None and job.status == JobStatus.COMPLETED, job.error
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert any(event.kind == JobEventKind.RESTART for event in events)
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)).all()
        assert sorted(m.step for m in metrics) == list(range(1, 31))
