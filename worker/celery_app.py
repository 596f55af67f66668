"""Builds the Celery app the workers and the API share: JSON only, one acked-late job at a time."""

from __future__ import annotations

from celery import Celery

from app.settings import Settings

# The queue every fine-tuning job goes to; a worker consumes it unless told otherwise.
TRAIN_QUEUE = "tuneforge.train"

# A hard ceiling on one delivery, so a hung run cannot hold a GPU forever. A module constant until
# Settings grows a field for it; make_celery is the only reader, so that change is one line here.
TASK_TIME_LIMIT_SECONDS = 24 * 3600


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
        task_time_limit=TASK_TIME_LIMIT_SECONDS,
        task_default_queue=TRAIN_QUEUE,
        broker_connection_retry_on_startup=True,
    )
    return celery
