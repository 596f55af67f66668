"""A job's metrics as a stream of Predibase frames: history first, then live rows until the job ends.

Both the WebSocket (what the Predibase SDK opens) and the Server-Sent-Events twin (browsers, curl,
the thin client) are fed by `frames`, which polls the database: the worker writes one metrics row
per step from another process, so the database is the only place both sides share. The polls run
on a thread limiter of their own (`AppContext.stream_limiter`): watchers neither wait behind the
request handlers' thread pool nor take its threads.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter, to_thread
from sqlalchemy import select
from tuneforge.rules.metrics import PREDIBASE_ACCURACY_KEYS, grpo_rewards

from app.context import AppContext
from app.db import FinetuningJob, JobMetric
from app.services.jobs import FINAL_STATUSES

POLL_SECONDS = 0.5
# An idle stream still says something this often, so proxies and clients know it is alive and the
# server learns, by the failed send, that a client has gone.
KEEPALIVE_SECONDS = 15.0
# What the Predibase SDK puts at the start of its User-Agent (see `for_predibase_sdk`).
PREDIBASE_SDK_AGENT = "predibase-sdk/"


@dataclass(frozen=True)
class _Snapshot:
    uuid: str
    status: str
    steps_done: int
    total_steps: int | None
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class StreamFrame:
    """One frame to send; `keepalive` marks a repeat of the latest frame sent because nothing is new."""

    body: dict[str, Any]
    keepalive: bool = False


def _finite(value: float | None) -> float | None:
    # JSON has no NaN: browsers' JSON.parse refuses the frame, and NaN != NaN would resend it forever.
    return value if value is None or math.isfinite(value) else None


def _read(ctx: AppContext, job_id: int, from_step: int) -> _Snapshot:
    """The job's state and its rows from `from_step` on (that one again: an eval may have joined it).

    The job is read before its rows, so a final status seen here comes with every row written before it.
    """
    with ctx.sessions() as session:
        job = session.get(FinetuningJob, job_id)
        if job is None:  # deleted with its repo while someone watched
            return _Snapshot("", "canceled", 0, None, [])
        rows = session.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job_id, JobMetric.step >= from_step)
            .order_by(JobMetric.step)
        ).all()
        return _Snapshot(
            job.uuid,
            job.status,
            job.steps_done,
            job.total_steps,
            [
                {
                    "step": r.step,
                    "epoch": _finite(r.epoch),
                    "train_loss": _finite(r.train_loss),
                    "eval_loss": _finite(r.eval_loss),
                    "learning_rate": _finite(r.learning_rate),
                    "tokens": r.tokens,
                    "tokens_per_second": _finite(r.tokens_per_second),
                    "checkpoint_number": r.checkpoint_number,
                    "task_metrics": r.task_metrics or None,
                }
                for r in rows
            ],
        )


def frame(
    snapshot: _Snapshot, row: dict[str, Any] | None, checkpoints: int, completed: bool
) -> dict[str, Any]:
    """One Predibase metrics frame (`data` for the row, `meta` for the job)."""
    row = row or {}
    step = row.get("step", 0)
    epoch = row.get("epoch")
    steps_per_epoch = round(step / epoch) if epoch else (snapshot.total_steps or 0)
    return {
        "data": {
            "steps": step,
            # The SDK parses epoch as an integer: the epoch this step belongs to, counted from 1.
            "epoch": math.ceil(epoch) if epoch else None,
            "checkpoint_number": row.get("checkpoint_number") or checkpoints,
            "train_metrics_loss": row.get("train_loss"),
            "validation_metrics_loss": row.get("eval_loss"),
            "learning_rate": row.get("learning_rate"),
            "total_tokens_used": row.get("tokens"),
            # Not in Predibase's frame (its SDK ignores unknown keys); the thin client's bar shows it.
            "tokens_per_second": row.get("tokens_per_second"),
            **_task_frame_fields(row.get("task_metrics")),
        },
        "meta": {
            "is_completed": completed,
            "model_uuid": snapshot.uuid,
            "run_id": snapshot.uuid,
            "status": snapshot.status,
            "steps": snapshot.steps_done,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": snapshot.total_steps or 0,
        },
    }


def _task_frame_fields(task_metrics: dict[str, float] | None) -> dict[str, Any]:
    """A task's metrics in the frame: grpo's rewards and classification's accuracies under the keys the
    Predibase SDK's progress tables read, and all of them under `task_metrics`."""
    if not task_metrics:
        return {}
    fields: dict[str, Any] = {"task_metrics": task_metrics}
    rewards = grpo_rewards(task_metrics)
    if rewards is not None:
        fields["grpo_train_rewards"] = rewards
    for name, key in PREDIBASE_ACCURACY_KEYS.items():
        if name in task_metrics:
            fields[key] = task_metrics[name]
    return fields


def for_predibase_sdk(body: dict[str, Any]) -> dict[str, Any]:
    """The frame as the Predibase SDK can follow it: `checkpoint_number` held at 0.

    The SDK (2025.10, progress-table 0.1.26) adds a table row whenever `checkpoint_number` grows,
    and for any task but classification that row writes accuracy columns its table lacks. The
    AssertionError is swallowed, the checkpoint is never marked seen, and every later frame takes
    the same path: its progress bar freezes at the first checkpoint (step 50 by default) and it
    never sees `is_completed`. Held at 0, the bar follows every step and the watch ends on the
    completion frame; the checkpoints stay in `GET .../metrics` and the SSE stream.
    """
    return {"data": body["data"] | {"checkpoint_number": 0}, "meta": body["meta"]}


@dataclass
class _Cursor:
    """What one watcher has been sent: the step to read from, and what that step's row looked like."""

    next_step: int = 0
    last_sent: dict[str, Any] | None = None
    evals_seen: set[int] = field(default_factory=set)

    def fresh(self, snapshot: _Snapshot) -> list[dict[str, Any]]:
        """Frames for the rows not sent yet, or changed since (an eval or checkpoint merged in)."""
        out = []
        for row in snapshot.rows:
            if row == self.last_sent:
                continue  # the row we resumed from, unchanged
            if row["eval_loss"] is not None:
                self.evals_seen.add(row["step"])
            self.last_sent, self.next_step = row, row["step"]
            out.append(frame(snapshot, row, len(self.evals_seen), completed=False))
        return out

    def latest(self, snapshot: _Snapshot, completed: bool = False) -> dict[str, Any]:
        return frame(snapshot, self.last_sent, len(self.evals_seen), completed)


async def frames(
    ctx: AppContext,
    job_id: int,
    *,
    poll_seconds: float = POLL_SECONDS,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[StreamFrame]:
    """Every stored row, then new rows as they land; ends with an `is_completed` frame.

    After `keepalive_seconds` without a row the latest frame comes again, marked `keepalive`.
    """
    limiter: CapacityLimiter = ctx.stream_limiter
    cursor = _Cursor()
    clock = asyncio.get_running_loop().time
    said_at = clock()
    while True:
        snapshot = await to_thread.run_sync(_read, ctx, job_id, cursor.next_step, limiter=limiter)
        for body in cursor.fresh(snapshot):
            said_at = clock()
            yield StreamFrame(body)
        if snapshot.status in FINAL_STATUSES:
            yield StreamFrame(cursor.latest(snapshot, completed=True))
            return
        if clock() - said_at >= keepalive_seconds:
            said_at = clock()
            yield StreamFrame(cursor.latest(snapshot), keepalive=True)
        await asyncio.sleep(poll_seconds)
