"""The control plane's side of the job queue: hands job and dataset ids to Celery workers by task name.

The API never imports `worker/` (no torch in the API image): it sends `tuneforge.train` (a job
id), `tuneforge.export` (a version id) and `tuneforge.validate` (a dataset id) by name,
to the train queue or the validate queue, with a JSON payload.
The database, not the broker, is the record of what was accepted; a failed send leaves the job
`queued` (the dataset `validating`) for the sweeper to send again.
"""

from __future__ import annotations

import logging

from celery import Celery

from app.settings import Settings

log = logging.getLogger(__name__)

TRAIN_TASK = "tuneforge.train"
VALIDATE_TASK = "tuneforge.validate"
EXPORT_TASK = "tuneforge.export"
# Connecting to a broker that is down must fail the send quickly, not hold the request open.
SEND_TIMEOUT_SECONDS = 3.0


def redis_transport_options(broker_url: str, **options: float) -> dict[str, float]:
    """`options` for a Redis broker, none for others (kombu's SQLAlchemy transport hands its
    options to `create_engine`, which refuses keys it does not know)."""
    return options if broker_url.startswith(("redis://", "rediss://")) else {}


def class_queue(train_queue: str, worker_class: str) -> str:
    """The train queue of one worker class: `tuneforge.train.<class>` with the default train queue."""
    return f"{train_queue}.{worker_class}"


class EnqueueError(Exception):
    """The broker did not take the message; the job stays queued and the sweeper retries."""


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self._queue = settings.train_queue
        self._validate_queue = settings.validate_queue
        self._celery = Celery("tuneforge-api", broker=settings.broker_url, set_as_current=False)
        self._celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=SEND_TIMEOUT_SECONDS,
            broker_connection_retry=False,
            broker_transport_options=redis_transport_options(
                settings.broker_url, socket_connect_timeout=SEND_TIMEOUT_SECONDS
            ),
        )

    def send_train(self, job_id: int, queue: str | None = None) -> None:
        """Publish one job id to `queue` (default: the train queue); EnqueueError if the broker is down."""
        self._send(TRAIN_TASK, job_id, queue or self._queue)

    def send_validate(self, dataset_id: int) -> None:
        """Publish one dataset id to the validate queue; raises EnqueueError if the broker is unreachable."""
        self._send(VALIDATE_TASK, dataset_id, self._validate_queue)

    def send_export(self, version_id: int) -> None:
        """Publish one version id to the train queue (merging needs the base model in memory, as training
        does; the validate queue's children are capped far below that); raises EnqueueError."""
        self._send(EXPORT_TASK, version_id, self._queue)

    def _send(self, task: str, row_id: int, queue: str) -> None:
        try:
            self._celery.send_task(task, args=[row_id], queue=queue, retry=False)
        except Exception as exc:  # kombu/redis raise a zoo of connection errors; all mean the same here
            raise EnqueueError(f"broker unreachable: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._celery.close()
