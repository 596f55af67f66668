"""The metrics stream keeps pace with a long job: over the WebSocket, over SSE and in the Predibase SDK.

A writer process records a 120-step job's metrics through the same service calls and commits as a
training worker, at a training pace, with an eval and a checkpoint every 50 steps; watchers on both
transports, and the real SDK's `watch`, must show every step within seconds of its row's commit.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from predibase import Predibase
from predibase.resources import finetuning_jobs as sdk_jobs
from sqlalchemy import event, select
from websockets.sync.client import connect

from app.db import FinetuningJob
from app.supervision.serving_processes import settings_environment

pytestmark = pytest.mark.e2e

STEPS = 120
# tiny-random-llama's pace on a CPU; the default checkpoint (and eval) interval of a real job.
STEP_SECONDS = 0.1
CHECKPOINT_EVERY = 50
# How late a watcher may show a step: a few polls of the stream on a loaded machine.
MAX_LAG_SECONDS = 5.0
WATCH_TIMEOUT_SECONDS = 90.0
WRITER = Path(__file__).with_name("metrics_writer.py")


class Arrivals:
    """When one watcher first showed each step (unix time), and the frames it received."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.frames: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def saw(self, step: int) -> None:
        self.at.setdefault(step, time.time())

    def frame(self, body: dict[str, Any]) -> None:
        self.frames.append(body)
        self.saw(body["data"]["steps"])

    def late_or_missing(self, committed: dict[int, float]) -> dict[int, float | None]:
        """Steps shown more than MAX_LAG_SECONDS after their commit (lag), or never (None)."""
        worst: dict[int, float | None] = {}
        for step, at in committed.items():
            shown = [t for s, t in self.at.items() if s >= step]  # a later step shows this one passed
            lag = min(shown) - at if shown else None
            if lag is None or lag > MAX_LAG_SECONDS:
                worst[step] = lag
        return worst


class _ProgressSink(io.StringIO):
    """Where the SDK's table prints: notes when its progress bar first showed each step."""

    def __init__(self, arrivals: Arrivals) -> None:
        super().__init__()
        self.arrivals = arrivals

    def write(self, text: str) -> int:
        for match in re.finditer(r"(\d+)/\d+ steps", text):
            self.arrivals.saw(int(match.group(1)))
        return super().write(text)


def _in_thread(target: Callable[[Arrivals], None], arrivals: Arrivals) -> threading.Thread:
    def run() -> None:
        try:
            target(arrivals)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            arrivals.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _ws_url(server: Any, uuid: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v2/finetuning/jobs/{uuid}/metrics/stream"


def _watch_ws(server: Any, token: str, uuid: str) -> Callable[[Arrivals], None]:
    def watch(arrivals: Arrivals) -> None:
        deadline = time.monotonic() + WATCH_TIMEOUT_SECONDS
        headers = {"Authorization": f"Bearer {token}"}
        with connect(_ws_url(server, uuid), additional_headers=headers, open_timeout=10) as ws:
            while not (arrivals.frames and arrivals.frames[-1]["meta"]["is_completed"]):
                arrivals.frame(json.loads(ws.recv(timeout=deadline - time.monotonic())))

    return watch


def _watch_sse(server: Any, token: str, uuid: str) -> Callable[[Arrivals], None]:
    def watch(arrivals: Arrivals) -> None:
        url = f"{server.url}/v2/finetuning/jobs/{uuid}/metrics/stream"
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30.0)) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    arrivals.frame(json.loads(line.removeprefix("data: ")))

    return watch


def _watch_sdk(pb: Predibase, uuid: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[Arrivals], None]:
    real_table = sdk_jobs._get_metrics_table

    def watch(arrivals: Arrivals) -> None:
        def table_printing_to_sink(task_type: str) -> Any:
            table = real_table(task_type)
            table.files = (_ProgressSink(arrivals),)  # the SDK's own table, printing where we read
            return table

        monkeypatch.setattr(sdk_jobs, "_get_metrics_table", table_printing_to_sink)
        job = pb.finetuning.jobs.watch(uuid)
        assert job.status == "completed", job.status

    return watch


@pytest.fixture
def queued_job(  # type: ignore[no-untyped-def]
    live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, int]]:
    """(token, job uuid, job id) of a queued 120-step job, made through the SDK and the API."""
    token = live_server.mint_token(f"t-{time.monotonic_ns()}")
    monkeypatch.setenv("PREDIBASE_GATEWAY", live_server.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", token)
    rows = tmp_path / "rows.jsonl"
    lines = (json.dumps({"prompt": f"p{n}", "completion": f" c{n}"}) for n in range(20))
    rows.write_text("\n".join(lines) + "\n")
    pb = Predibase()
    pb.datasets.from_file(str(rows), name="rows")
    pb.repos.create(name="paced", exists_ok=True)
    body = {
        "params": {"base_model": "tiny-random-llama", "train_steps": STEPS},
        "dataset": "rows",
        "repo": "paced",
    }
    created = httpx.post(
        f"{live_server.url}/v2/finetuning/jobs", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert created.status_code == 200, created.text
    uuid = created.json()["uuid"]
    with live_server.app.state.ctx.sessions() as session:
        job_id = session.scalars(select(FinetuningJob.id).where(FinetuningJob.uuid == uuid)).one()
    yield token, uuid, job_id


def _write_metrics(live_server: Any, job_id: int) -> dict[int, float]:
    """Run the writer process to the end; when each step's row was committed (unix time)."""
    done = subprocess.run(
        [sys.executable, str(WRITER), str(job_id), str(STEPS), str(STEP_SECONDS), str(CHECKPOINT_EVERY)],
        env=settings_environment(live_server.app.state.ctx.settings),
        capture_output=True,
        text=True,
        timeout=WATCH_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["step"]: r["at"] for r in map(json.loads, done.stdout.splitlines())}


def test_every_step_reaches_websocket_sse_and_sdk_watchers_within_seconds_of_its_row(  # type: ignore[no-untyped-def]
    live_server, queued_job: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, uuid, job_id = queued_job
    watchers = {
        "websocket": _watch_ws(live_server, token, uuid),
        "sse": _watch_sse(live_server, token, uuid),
        "predibase sdk": _watch_sdk(Predibase(), uuid, monkeypatch),
    }
    arrivals = {name: Arrivals() for name in watchers}
    threads = [_in_thread(watch, arrivals[name]) for name, watch in watchers.items()]

    committed = _write_metrics(live_server, job_id)

    for thread in threads:
        thread.join(timeout=WATCH_TIMEOUT_SECONDS)
    assert sorted(committed) == list(range(1, STEPS + 1))
    for name, seen in arrivals.items():
        assert seen.error is None, f"{name}: {seen.error!r}"
        assert seen.late_or_missing(committed) == {}, f"{name} fell behind (step: lag, None = never)"
    for name in ("websocket", "sse"):
        frames = arrivals[name].frames
        assert frames[-1]["meta"]["is_completed"] and frames[-1]["data"]["steps"] == STEPS
        assert not any(f["meta"]["is_completed"] for f in frames[:-1])
        # A step's row is sent again as its eval and checkpoint merge in: the last version counts.
        final = {f["data"]["steps"]: f["data"] for f in frames}
        assert [s for s, d in final.items() if d["validation_metrics_loss"] is not None] == [50, 100, 120]
        assert [final[s]["checkpoint_number"] for s in (49, 50, 99, 100, 120)] == [0, 1, 1, 2, 3]


def test_a_websocket_watcher_that_leaves_stops_the_polling_at_once(  # type: ignore[no-untyped-def]
    live_server, queued_job: tuple[str, str, int]
) -> None:
    token, uuid, _ = queued_job
    engine = live_server.app.state.ctx.engine
    polls: list[float] = []

    def count_polls(conn, cursor, statement: str, *args: Any) -> None:  # type: ignore[no-untyped-def]
        if "FROM job_metrics" in statement:
            polls.append(time.monotonic())

    event.listen(engine, "before_cursor_execute", count_polls)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with connect(_ws_url(live_server, uuid), additional_headers=headers, open_timeout=10):
            deadline = time.monotonic() + 10
            while not polls and time.monotonic() < deadline:
                time.sleep(0.05)
            assert polls, "the stream never polled"
        left_at = time.monotonic()
        time.sleep(2.0)  # four poll intervals: a stream still running would poll in this window
    finally:
        event.remove(engine, "before_cursor_execute", count_polls)
    # One poll may already have been under way when the client left.
    assert len([t for t in polls if t > left_at + 0.1]) <= 1, polls
