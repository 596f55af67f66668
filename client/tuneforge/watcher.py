"""Following one fine-tuning job to its end: the metrics stream, reconnects, and the polling fallback."""

from __future__ import annotations

import json
import sys
import time

import httpx
import pydantic

from tuneforge._http import HttpTransport, path_segment
from tuneforge._sse import SSEDecoder
from tuneforge.errors import NotFoundError, ServerError, ServerUnreachableError
from tuneforge.models import FinetuningJob, MetricsFrame
from tuneforge.progress import ProgressBar, TrainingProgress

# Consecutive stream connections that bring no new frame before the watcher settles for polling.
STREAM_FAILURES_BEFORE_POLLING = 3
_MAX_RECONNECT_DELAY_SECONDS = 10.0


def parse_frame(data: str) -> MetricsFrame | None:
    """One event's data as a metrics frame; None for anything else (the stream is read on regardless)."""
    try:
        return MetricsFrame.model_validate(json.loads(data))
    except (ValueError, pydantic.ValidationError):
        return None


def detach_message(job_uuid: str, adapter_id: str) -> str:
    """What to tell a user who stopped watching: the job runs on, and how to re-attach or cancel it."""
    return (
        f"\nStopped watching. Fine-tuning job {job_uuid} ({adapter_id}) keeps running on the server.\n"
        f'  re-attach: pb.finetuning.jobs.watch("{job_uuid}")\n'
        f"             tuneforge jobs watch {job_uuid}\n"
        f'  cancel:    pb.finetuning.jobs.cancel("{job_uuid}")  or  pb.adapters.cancel("{adapter_id}")\n'
        f"             tuneforge adapters cancel {adapter_id}\n"
    )


class JobWatcher:
    """Blocks until a job is final, drawing its progress from the server's metrics stream.

    A dropped stream is reopened (the replayed history changes nothing already shown); after
    STREAM_FAILURES_BEFORE_POLLING connections in a row that bring nothing new, the job is polled.
    """

    def __init__(self, http: HttpTransport, *, poll_interval: float = 1.0) -> None:
        self._http = http
        self._poll_interval = poll_interval

    def watch(self, job_uuid: str, *, show_progress: bool = True) -> FinetuningJob:
        """Return the job once completed, errored or canceled.

        Ctrl-C stops watching, not the job: how to re-attach or cancel is printed, and the
        KeyboardInterrupt goes on up.
        """
        job = self._get(job_uuid)
        if job.is_final:
            return job
        progress = TrainingProgress()
        progress.apply_job(job)
        bar = ProgressBar(progress, enabled=show_progress)
        try:
            if not self._follow_stream(job_uuid, progress, bar):
                return self._poll_until_final(job_uuid, progress, bar, first_interval=self._poll_interval)
            # The last frame can come just before the job's final status is committed.
            return self._poll_until_final(job_uuid, progress, bar, first_interval=0.1)
        except KeyboardInterrupt:
            bar.close()
            print(detach_message(job.uuid, job.adapter_id), file=sys.stderr)
            raise
        finally:
            bar.close()

    def _follow_stream(self, job_uuid: str, progress: TrainingProgress, bar: ProgressBar) -> bool:
        """Read the stream to its completion frame; False if it failed too often to rely on."""
        failures = 0
        while failures < STREAM_FAILURES_BEFORE_POLLING:
            newest = progress.frame_step
            try:
                self._read_stream(job_uuid, progress, bar)
            except NotFoundError:
                # The job exists (it was just fetched): a server without the stream route. Poll.
                return False
            except (ServerError, ServerUnreachableError):
                pass  # could not open it: counted below like a connection that brought nothing
            if progress.completed:
                return True
            # The stream ended early; the job may have ended anyway, without a completion frame.
            job = self._get(job_uuid)
            progress.apply_job(job)
            bar.show(progress)
            if job.is_final:
                return True
            # A connection that brought a frame never seen before works, however briefly it lasted;
            # one that only replayed history (or nothing) counts against the stream.
            failures = 0 if progress.frame_step > newest else failures + 1
            time.sleep(min(self._poll_interval * 2**failures, _MAX_RECONNECT_DELAY_SECONDS))
        return False

    def _read_stream(self, job_uuid: str, progress: TrainingProgress, bar: ProgressBar) -> None:
        """One connection: fold frames in until the completion frame, the end of the body, or a drop."""
        path = f"/v2/finetuning/jobs/{path_segment(job_uuid)}/metrics/stream"
        response = self._http.open_stream(path, headers={"Accept": "text/event-stream"})
        decoder = SSEDecoder()
        try:
            for chunk in response.iter_bytes():
                frames = [f for f in map(parse_frame, decoder.feed(chunk)) if f is not None]
                # A list, not a generator: any() must not stop before every frame is folded in.
                if any([progress.apply_frame(frame) for frame in frames]):
                    bar.show(progress)
                if progress.completed:
                    return
        except httpx.TransportError:
            return  # dropped mid-body (reset, timeout, truncated chunk): the caller reconnects
        finally:
            response.close()

    def _poll_until_final(
        self, job_uuid: str, progress: TrainingProgress, bar: ProgressBar, *, first_interval: float
    ) -> FinetuningJob:
        interval = min(first_interval, self._poll_interval)
        while True:
            job = self._get(job_uuid)
            progress.apply_job(job)
            bar.show(progress)
            if job.is_final:
                return job
            time.sleep(interval)
            interval = min(interval * 2, self._poll_interval)

    def _get(self, job_uuid: str) -> FinetuningJob:
        return FinetuningJob.model_validate(
            self._http.api("GET", f"/v2/finetuning/jobs/{path_segment(job_uuid)}")
        )
