"""Builds the Celery apps of the two worker nodes: training (one acked-late job at a time) and validation.

A training node consumes its worker class's train queue (`settings.worker_class`), and the default one
when no class is larger (see `train_queues`).

Both speak JSON only and take ids, never pickled objects. They are separate nodes (processes) on
separate queues, so a validation never waits behind an hours-long training job.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.queue import class_queue, redis_transport_options
from app.settings import Settings

HARD_LIMIT_GRACE_SECONDS = 300
# Room for a validate node's visibility timeout beyond its hard time limit: Redis must not hand a
# running validation's message to a second node.
_VALIDATE_VISIBILITY_MARGIN_SECONDS = 600

_COMMON: dict[str, Any] = {
    # Tasks carry ids, never pickled objects: JSON in, JSON out, nothing else accepted.
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    # State lives in the database; Celery results would be a second, unread copy.
    "task_ignore_result": True,
    # A worker lost mid-task leaves the message unacked, so another worker picks it up again.
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    # Never reserve a second message behind a running one.
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
}


def make_celery(settings: Settings) -> Celery:
    """The training node's app on `settings.broker_url`; register tasks with `worker.tasks.register_tasks`."""
    celery = Celery("tuneforge", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        _COMMON,
        # One job per worker process.
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
        task_default_queue=train_queues(settings)[0],
    )
    return celery


def train_queues(settings: Settings) -> list[str]:
    """The train queues this worker consumes: its class's (`tuneforge.train.<class>`) first, when it has
    one; and the default queue unless a larger class exists. The default queue holds the jobs nothing
    could estimate (their base model's config.json is unknown to the control plane): the largest
    machines take those, as every worker took every job before classes existed."""
    if settings.worker_class is None:
        return [settings.train_queue]
    own = class_queue(settings.train_queue, settings.worker_class)
    largest = max(spec.memory_gib for spec in settings.worker_classes)
    mine = next(spec for spec in settings.worker_classes if spec.name == settings.worker_class)
    return [own, settings.train_queue] if mine.memory_gib >= largest else [own]


# Resident memory (KiB, Celery's unit) past which a validate child is replaced after its task.
VALIDATE_CHILD_MAX_RSS_KIB = 512 * 1024


def make_validate_celery(settings: Settings) -> Celery:
    """The validate node's app; register its task with `worker.validate_task.register_validate_task`."""
    from app.services.dataset_files.validation import hard_time_limit

    celery = Celery("tuneforge-validate", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        _COMMON,
        worker_concurrency=settings.validation_concurrency,
        # Children are reused: replacing one after every validation made each validation after it wait
        # seconds for the pool to refill. A child a big file left holding more than this much resident
        # memory is replaced once its validation ends; its address-space cap (set at start) bounds
        # every validation it runs.
        worker_max_memory_per_child=VALIDATE_CHILD_MAX_RSS_KIB,
        broker_transport_options=redis_transport_options(
            settings.broker_url,
            visibility_timeout=hard_time_limit(settings) + _VALIDATE_VISIBILITY_MARGIN_SECONDS,
        ),
        task_default_queue=settings.validate_queue,
    )
    return celery
