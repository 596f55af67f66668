"""The `tuneforge.train` task: thin glue from a job id to a training run and back into the database."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.orm import Session
from tuneforge.rules.metrics import EVAL_STEP_FIELDS, TRAIN_STEP_FIELDS, step_values, task_values

from app.context import AppContext
from app.db import Dataset, FinetuningJob, JobStatus
from app.db.jobs import JobEventKind
from app.errors import ConflictError
from app.queue import TRAIN_TASK
from app.services import jobs, versions
from worker import artifact_checks
from worker.db_retry import RetryingCallbacks, retrying
from worker.export_task import register_export_task
from worker.job_io import (
    download_checkpoint,
    download_files,
    job_rows,
    rows_fingerprint,
    token_cache_for,
    upload_dir,
)
from worker.model_store import (
    MODEL_ERRORS,
    model_cache_dir,
    resolve_model_dir,
    trusts_remote_code,
)
from worker.rollouts import EngineRolloutSampler
from worker.serve_main import kernel_config
from worker.training.base_models import local_model_dir
from worker.training.config import TrainingConfig
from worker.training.data import DataStats, TrainingDataError
from worker.training.distributed import DistributedTrainingError, available_devices, train_on_devices
from worker.training.loop import NoCallbacks, TrainingResult
from worker.training.methods import NonFiniteWeightsError
from worker.training.preparation import DEFAULT_MAX_SEQ_LENGTH
from worker.training.reward_sandbox import SandboxLimits
from worker.training.runtime import TrainingConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures whose message tells the user what to change; anything else is our bug and is re-raised.
USER_ERRORS = (
    ValidationError,
    *MODEL_ERRORS,
    TrainingDataError,
    TrainingConfigError,
    NonFiniteWeightsError,
    versions.ParentMissingError,
)


def register_tasks(celery: Celery, ctx: AppContext) -> None:
    """Bind the tasks to `celery`, each closing over the worker's long-lived context."""

    register_export_task(celery, ctx)

    @celery.task(name=TRAIN_TASK, bind=True)
    def train_job(self: Any, job_id: int) -> None:
        # The pool child's pid too: with a fresh child per job, it names this very attempt.
        run_job(ctx, job_id, worker_id=f"{self.request.hostname or 'worker'}/{os.getpid()}")


def run_job(ctx: AppContext, job_id: int, *, worker_id: str) -> None:
    """Train job `job_id` to a final status; a delivery of an already finished job is dropped."""
    with ctx.sessions() as session:
        job = _retry(ctx, session, lambda: session.get(FinetuningJob, job_id), f"job {job_id}: loading")
        if job is None:
            log.warning("job %s no longer exists; dropping its delivery", job_id)
            return
        try:
            _retry(ctx, session, lambda: _start(ctx, session, job, worker_id), f"job {job_id}: starting")
        except ConflictError as exc:
            if isinstance(exc, jobs.AttemptsExhaustedError):
                session.commit()  # the job was just ended `errored`: record it
            else:
                session.rollback()
            log.info("job %s: %s; dropping this delivery", job_id, exc)
            return
        try:
            with _lease(ctx, job_id, worker_id):
                _train_and_publish(ctx, session, job)
        except USER_ERRORS as exc:
            _end(session, job, JobStatus.ERRORED, error=str(exc))
        except DistributedTrainingError:
            # A rank died (OOM-killed, a lost GPU): handled as a lost worker. The job stays `training`,
            # its lease lapses, and the sweeper redelivers it to resume from its last checkpoint
            # (TUNEFORGE_JOB_MAX_ATTEMPTS bounds how often).
            session.rollback()
            log.exception("job %s: a training rank died; the job resumes from its last checkpoint", job_id)
        except SoftTimeLimitExceeded:
            limit = ctx.settings.job_time_limit_seconds
            error = (
                f"the job ran past its time limit of {limit} s (TUNEFORGE_JOB_TIME_LIMIT_SECONDS) and was "
                "stopped; its last checkpoint is kept"
            )
            _end(session, job, JobStatus.ERRORED, error=error)
        except Exception as exc:
            try:
                error = f"internal error while training ({type(exc).__name__}); the worker log has details"
                _end(session, job, JobStatus.ERRORED, error=error)
            except Exception:
                log.exception("job %s: could not record the failure", job_id)
            raise


def _start(ctx: AppContext, session: Session, job: FinetuningJob, worker_id: str) -> None:
    settings = ctx.settings
    jobs.start_attempt(
        session,
        job,
        worker_id=worker_id,
        lease_seconds=settings.job_lease_seconds,
        max_attempts=settings.job_max_attempts,
    )
    session.commit()


def _retry(ctx: AppContext, session: Session, write: Callable[[], T], what: str) -> T:
    """`write` through a database outage of up to TUNEFORGE_WORKER_DB_RETRY_SECONDS (see worker.db_retry)."""
    return retrying(session, write, budget_seconds=ctx.settings.worker_db_retry_seconds, what=what)


@contextmanager
def _lease(ctx: AppContext, job_id: int, worker_id: str) -> Iterator[None]:
    """Refresh the job's heartbeat on a thread while the body runs (model loading, eval and steps alike).

    If this process dies the heartbeat stops, and the control plane's sweeper re-enqueues the job
    once the lease expires.
    """
    stopped = threading.Event()
    interval = ctx.settings.job_lease_seconds / 3

    def beat() -> None:
        while not stopped.wait(interval):
            try:
                with ctx.sessions() as session:
                    held = jobs.heartbeat(session, job_id, worker_id)
                    session.commit()
                if not held:
                    log.warning("job %s was taken over by another worker", job_id)
            except Exception:
                # A database blip: the next beat retries; the lease outlasts a few missed beats.
                log.exception("job %s: heartbeat failed", job_id)

    thread = threading.Thread(target=beat, name=f"lease-job-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join(timeout=5)


def _train_and_publish(ctx: AppContext, session: Session, job: FinetuningJob) -> None:
    config = TrainingConfig.model_validate(job.params)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
    held_out = session.get(Dataset, job.eval_dataset_id) if job.eval_dataset_id is not None else None
    # A job created with an evaluation dataset that was deleted since keeps its name: refused, not run
    # on a holdout of the training rows it was never meant to have.
    rows = job_rows(ctx.store, dataset, held_out, has_held_out=job.eval_dataset_name is not None)
    tenant_uuid = jobs.tenant_uuid(session, job)
    model_dir, trust_remote_code = _base_model(ctx, config)
    with (
        tempfile.TemporaryDirectory(prefix=f"tuneforge-job-{job.id}-") as scratch,
        _rollout_sampler(ctx, config, model_dir) as rollouts,
    ):
        checkpoint = jobs.latest_checkpoint(session, job)
        resume_from = (
            download_checkpoint(ctx.store, checkpoint, Path(scratch) / "resume") if checkpoint else None
        )
        init_from = _starting_weights(ctx, session, job, resume_from, Path(scratch) / "parent")
        callbacks = _JobCallbacks(
            ctx,
            session,
            job,
            f"tenants/{tenant_uuid}/jobs/{job.uuid}/checkpoints/",
            keep_checkpoints=config.keep_n_checkpoints,
        )
        retried = RetryingCallbacks(
            callbacks, session, budget_seconds=ctx.settings.worker_db_retry_seconds, job_id=job.id
        )
        result = train_on_devices(
            _devices(ctx, config),
            config,
            rows,
            output_dir=Path(scratch) / "run",
            cache_dir=model_cache_dir(ctx.settings),
            model_dir=model_dir,
            trust_remote_code=trust_remote_code,
            callbacks=retried,
            resume_from=resume_from,
            init_from=init_from,
            data_cache=token_cache_for(ctx.store, dataset),
            dataset_fingerprint=rows_fingerprint(dataset, held_out),
            collective_timeout_seconds=ctx.settings.worker_collective_timeout_seconds,
            rollouts=rollouts,
            reward_limits=_reward_limits(ctx),
        )
        if result.stopped or result.adapter_dir is None:
            _retry(ctx, session, lambda: _end(session, job, JobStatus.CANCELED), f"job {job.id}: canceling")
            return
        # The serving engine answers the quality report's rows (and times turbo heads) as a deployment
        # would, before the artifact and its summary are stored.
        artifact_checks.add_to_summary(result, kernels=kernel_config(ctx.settings, os.environ))
        versions_prefix = f"tenants/{tenant_uuid}/repos/{job.version.repo.uuid}/versions/"

        def publish() -> None:  # whole: a failed commit's rollback drops the version's new fields too
            _publish(ctx, job, result, versions_prefix)
            _end(session, job, JobStatus.COMPLETED)

        _retry(ctx, session, publish, f"job {job.id}: publishing")


@contextmanager
def _rollout_sampler(
    ctx: AppContext, config: TrainingConfig, model_dir: Path | None
) -> Iterator[EngineRolloutSampler | None]:
    """Task grpo's rollouts: tuneforge's serving engine on the same base model, in this process."""
    if config.task != "grpo" or config.base_model is None:
        yield None
        return
    directory = local_model_dir(config.base_model, model_dir, model_cache_dir(ctx.settings))
    # The run's context bounds prompt + completion (grpo_data.py), so the engine needs no longer one.
    context = config.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    sampler = EngineRolloutSampler(
        directory,
        max_model_len=context,
        kv_cache_bytes=ctx.settings.worker_rollout_kv_cache_bytes,
        kernels=kernel_config(ctx.settings, os.environ),
    )
    try:
        yield sampler
    finally:
        sampler.close()


def _reward_limits(ctx: AppContext) -> SandboxLimits:
    settings = ctx.settings
    return SandboxLimits(
        call_timeout_seconds=settings.reward_call_timeout_seconds,
        cpu_seconds=settings.reward_cpu_seconds,
        memory_bytes=settings.reward_memory_bytes,
    )


def _devices(ctx: AppContext, config: TrainingConfig) -> int:
    """The job's num_devices, capped at what this worker lends one job (the trajectory is the same on
    fewer devices, only slower)."""
    devices = min(config.num_devices, ctx.settings.worker_devices or available_devices())
    if devices < config.num_devices:
        log.info("job asks for %s devices; this worker lends %s", config.num_devices, devices)
    return devices


def _starting_weights(
    ctx: AppContext, session: Session, job: FinetuningJob, resume_from: Path | None, scratch: Path
) -> Path | None:
    """The parent's weights for a run continuing from a version; None for a run from the base model.

    A resumed run needs only its own checkpoint, which has the parent's layout (a PEFT adapter or a
    whole model): the parent may have been pruned since, and its files would be overwritten anyway.
    """
    if resume_from is not None:
        return resume_from if job.version.parent_version_id is not None else None
    parent = versions.parent_artifact(session, job.version)
    return download_files(ctx.store, *parent, scratch) if parent else None


def _publish(ctx: AppContext, job: FinetuningJob, result: TrainingResult, versions_prefix: str) -> None:
    """Store the artifact (weights + training_summary.json) and record what the run decided and measured."""
    assert result.adapter_dir is not None
    version = job.version
    prefix = f"{versions_prefix}{version.uuid}/"
    version.artifact_files = upload_dir(ctx.store, result.adapter_dir, prefix)
    version.artifact_prefix = prefix
    version.metrics_summary = _summary(result)
    # The config actually used: every default the worker resolved (target modules, lengths, dtype, ...).
    version.config = result.summary.get("config_used", version.config)
    version.autoconfig = result.summary.get("autoconfig") or {}
    version.quality_report = result.summary.get("quality_report") or {}


def _base_model(ctx: AppContext, config: TrainingConfig) -> tuple[Path | None, bool]:
    """The base model's local directory (built or fetched here on first use), and whether its own code
    may run; a config without a base model is refused by `train`."""
    if config.base_model is None:
        return None, False
    model_dir = resolve_model_dir(ctx.settings, ctx.store, config.base_model)
    return model_dir, trusts_remote_code(ctx.settings, config.base_model)


def _end(session: Session, job: FinetuningJob, status: JobStatus, *, error: str | None = None) -> None:
    """Final transition from whatever status the job is in now (a cancel may have moved it)."""
    if status == JobStatus.ERRORED:
        session.rollback()  # drop half-done writes of the failed run; the error must still land
    session.refresh(job, ["status"])
    if job.status == status:
        return  # a retried write whose first commit did land before the connection dropped
    jobs.transition(session, job, status, error=error)
    session.commit()


def _summary(result: TrainingResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "total_steps": result.total_steps,
        "train_loss": result.final_train_loss,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "published_step": result.best_step,
        "early_stopped": result.early_stopped,
        "tokens_seen": result.tokens_seen,
        "useful_tokens": result.useful_tokens,
        "train_seconds": round(result.train_seconds, 3),
        "truncated_rows": result.truncated_rows,
        "method": result.summary.get("method", {}),
        "runtime": result.summary.get("runtime", {}),
        "adapter_type": result.summary.get("adapter_type"),
        # turbo types: per-head top-1 accuracy on the eval split, for estimating acceptance length.
        "speculator": result.summary.get("speculator"),
    }


class _JobCallbacks(NoCallbacks):
    """Writes each step's metrics and each checkpoint as it happens; polls for a cancel."""

    def __init__(
        self,
        ctx: AppContext,
        session: Session,
        job: FinetuningJob,
        checkpoint_prefix: str,
        *,
        keep_checkpoints: int,
    ) -> None:
        self._ctx, self._session, self._job = ctx, session, job
        self._checkpoint_prefix = checkpoint_prefix
        self._keep_checkpoints = keep_checkpoints
        self._stop = False

    def on_data(self, stats: DataStats) -> None:
        if stats.truncated_rows and self._job.attempt <= 1:
            rows = ", ".join(str(n) for n in stats.truncated_row_numbers[:20])
            more = "" if stats.truncated_rows <= 20 else f" and {stats.truncated_rows - 20} more"
            jobs.add_event(
                self._session,
                self._job,
                JobEventKind.TRUNCATION,
                f"{stats.truncated_rows} of {stats.train_rows + stats.eval_rows} rows are longer than "
                f"max_seq_length ({stats.max_seq_length}) and were truncated (kept): "
                f"rows {rows}{more}",
                count=stats.truncated_rows,
                rows=list(stats.truncated_row_numbers),
            )
            self._session.commit()

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self._job.total_steps = total_steps
        jobs.record_metric(
            self._session,
            self._job,
            step,
            task_metrics=task_values(metrics),
            # The training library counts `tokens` as tokens_seen (its summary's name too).
            **step_values(metrics | {"tokens": metrics.get("tokens_seen")}, TRAIN_STEP_FIELDS),
        )
        self._session.commit()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        jobs.record_metric(
            self._session,
            self._job,
            step,
            task_metrics=task_values(metrics),
            **step_values(metrics, EVAL_STEP_FIELDS),
        )
        self._session.commit()

    def on_checkpoint(self, step: int, path: Path) -> None:
        prefix = f"{self._checkpoint_prefix}step-{step}/"
        files = upload_dir(self._ctx.store, path, prefix)
        checkpoint = jobs.record_checkpoint(self._session, self._job, step, prefix, files)
        jobs.record_metric(
            self._session,
            self._job,
            step,
            checkpoint_number=jobs.checkpoint_number(self._session, checkpoint),
        )
        pruned = jobs.prune_checkpoints(self._session, self._job, self._keep_checkpoints)
        self._session.commit()
        # Blobs go only after the rows are gone: a crash in between leaves orphaned bytes, never a
        # checkpoint row pointing at nothing.
        for old_prefix in pruned:
            self._ctx.store.delete_prefix(old_prefix)

    def on_phase(self, step: int, phase: str, detail: str) -> None:
        jobs.add_event(self._session, self._job, JobEventKind.PHASE, detail, phase=phase, step=step)
        self._session.commit()

    def should_stop(self) -> bool:
        """Asked before every optimizer step, so a cancel is honoured within one step (one indexed
        read per step: negligible beside a forward and backward pass)."""
        if self._stop:
            return True
        # A short session of its own: the run's session may hold a snapshot older than the cancel.
        with self._ctx.sessions() as session:
            self._stop = jobs.stop_requested(session, self._job.id)
        return self._stop
