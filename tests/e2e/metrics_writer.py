"""Writes a job's metrics like a training worker, from a process of its own, at a training pace.

`python metrics_writer.py JOB_ID STEPS STEP_SECONDS CHECKPOINT_EVERY`, with the control plane's
TUNEFORGE_* environment. Every call is one the worker's callbacks make (`app.services.jobs`), with
the same commits: a row per step, the eval merged into that step's row, then the checkpoint. Prints
`{"step": n, "at": unix time}` once each step's last write is committed, and the job ends completed.
"""

from __future__ import annotations

import json
import sys
import time

from app.context import AppContext
from app.db import FinetuningJob, JobStatus
from app.services import jobs
from app.settings import Settings

# Eval and checkpoint upload take a while in a real run; the watchers must ride out the pause.
EVAL_SECONDS = 0.5


def _report(step: int) -> None:
    print(json.dumps({"step": step, "at": time.time()}), flush=True)


def main(job_id: int, steps: int, step_seconds: float, checkpoint_every: int) -> None:
    ctx = AppContext.from_settings(Settings())
    with ctx.sessions() as session:
        job = session.get(FinetuningJob, job_id)
        assert job is not None, f"no job {job_id}"
        jobs.start_attempt(session, job, worker_id="metrics-writer", lease_seconds=60)
        session.commit()
        for step in range(1, steps + 1):
            time.sleep(step_seconds)
            job.total_steps = steps
            jobs.record_metric(
                session,
                job,
                step,
                train_loss=3.0 / step,
                learning_rate=2e-4,
                epoch=step / 40,
                tokens=512 * step,
                tokens_per_second=1000.0,
            )
            jobs.heartbeat(session, job_id, "metrics-writer")
            session.commit()
            if step % checkpoint_every == 0 or step == steps:
                time.sleep(EVAL_SECONDS)
                jobs.record_metric(session, job, step, eval_loss=2.5 / step, eval_perplexity=1.5)
                session.commit()
                checkpoint = jobs.record_checkpoint(session, job, step, f"ckpt/step-{step}/", {})
                jobs.record_metric(
                    session, job, step, checkpoint_number=jobs.checkpoint_number(session, checkpoint)
                )
                session.commit()
            _report(step)
        session.refresh(job, ["status"])
        jobs.transition(session, job, JobStatus.COMPLETED)
        session.commit()
    ctx.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
