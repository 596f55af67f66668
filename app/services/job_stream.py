"""A job's metrics as a stream of Predibase frames: history first, then live rows until the job ends.

Both the WebSocket (what the Predibase SDK opens) and the Server-Sent-Events twin (browsers, curl,
the thin client) are fed by `frames`, which polls the database: the worker writes one metrics row
per step from another process, so the database is the only place both sides share.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.context import AppContext
from app.db import FinetuningJob, JobMetric
from app.services.jobs import FINAL_STATUSES

POLL_SECONDS = 0.5
# An idle stream still says something this often, so proxies and clients know it is alive.
KEEPALIVE_SECONDS = 15.0


@dataclass(frozen=True)
class _Snapshot:
    uuid: str
    status: str
    steps_done: int
    total_steps: int | None
    rows: list[dict[str, Any]]


def _read(ctx: AppContext, job_id: int, from_step: int) -> _Snapshot:
    """The job's state and its rows from `from_step` on (that one again: an eval may have joined it)."""
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
                    "epoch": r.epoch,
                    "train_loss": r.train_loss,
                    "eval_loss": r.eval_loss,
                    "learning_rate": r.learning_rate,
                    "tokens": r.tokens,
                    "tokens_per_second": r.tokens_per_second,
                    "checkpoint_number": r.checkpoint_number,
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


async def frames(
    ctx: AppContext, job_id: int, poll_seconds: float = POLL_SECONDS
) -> AsyncIterator[dict[str, Any] | None]:
    """Every stored row, then new rows as they land; ends with an `is_completed` frame.

    Yields None after KEEPALIVE_SECONDS without a row, for the transport to send a keep-alive.
    """
    next_step, last_sent, checkpoints = 0, None, 0
    evals_seen: set[int] = set()
    idle_since = asyncio.get_running_loop().time()
    while True:
        snapshot = await run_in_threadpool(_read, ctx, job_id, next_step)
        now = asyncio.get_running_loop().time()
        if now - idle_since >= KEEPALIVE_SECONDS:
            idle_since = now
            yield None
        for row in snapshot.rows:
            if row == last_sent:
                continue  # the row we resumed from, unchanged
            if row["eval_loss"] is not None and row["step"] not in evals_seen:
                evals_seen.add(row["step"])
                checkpoints += 1
            last_sent, next_step, idle_since = row, row["step"], now
            yield frame(snapshot, row, checkpoints, completed=False)
        if snapshot.status in FINAL_STATUSES:
            yield frame(snapshot, last_sent, checkpoints, completed=True)
            return
        await asyncio.sleep(poll_seconds)
