"""Builds the Celery app the workers and the API share: JSON only, one acked-late job at a time."""

from __future__ import annotations

from celery import Celery

from app.queue import redis_transport_options
from app.settings import Settings

HARD_LIMIT_GRACE_SECONDS = 300


def make_celery(settings: Settings) -> Celery:
    """A Celery app on `settings.broker_url`; register tasks with `worker.tasks.register_tasks`."""
    celery = Celery("tuneforge", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        # Tasks carry ids, never pickled objects: JSON in, JSON out, nothing else accepted.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Job state lives in the database; Celery results would be a second, unread copy.
        task_ignore_result=True,
        # A worker lost mid-job leaves the message unacked, so another worker resumes the job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job per worker process: never reserve a second job behind a long training run.
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A fresh child per job hands all of a run's (GPU) memory back to the system when it ends.
        worker_max_tasks_per_child=1,
        # A hung run cannot hold a GPU forever: the soft limit raises inside the task, which ends the
        # job `errored` with its checkpoints kept; the hard limit kills a run that ignores it.
        task_soft_time_limit=settings.job_time_limit_seconds,
        task_time_limit=settings.job_time_limit_seconds + HARD_LIMIT_GRACE_SECONDS,
        # Lost workers are detected by the job lease (app.services.job_sweeper), not by the broker:
        # Redis must not hand a long run's message to a second worker while the first still trains.
        broker_transport_options=redis_transport_options(
            settings.broker_url, visibility_timeout=settings.job_time_limit_seconds + 3600
        ),
        task_default_queue=settings.train_queue,
        broker_connection_retry_on_startup=True,
    )
    return celery
