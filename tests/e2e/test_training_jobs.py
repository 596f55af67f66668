"""Fine-tuning end to end: the real Predibase SDK, a live control plane and real Celery worker processes.

Covers the job's whole life (queue → train → stored adapter that PEFT loads), its stream, cancel
within one step, a worker killed mid-run resuming from its checkpoint, and a broker outage.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from predibase import FinetuningConfig, Predibase
from sqlalchemy import select
from transformers import AutoModelForCausalLM
from websockets.sync.client import connect
from worker_fixtures import WorkerStack

from app.db import FinetuningJob, JobEvent, JobEventKind, JobMetric
from app.services import auth

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"
ROWS = [
    {"prompt": f"Repeat the word number {n}.", "completion": f" number {n} number {n}"} for n in range(48)
]
FINAL = {"completed", "errored", "canceled"}


def _api(stack: WorkerStack, token: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _prepare(stack: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Predibase, str]:
    token = stack.mint_token(f"t-{time.monotonic_ns()}")
    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", token)
    pb = Predibase()
    pb.datasets.from_file(_dataset_file(tmp_path), name="numbers")
    pb.repos.create(name="numbers", exists_ok=True)
    return pb, token


def _start_job(api: httpx.Client, **params: Any) -> dict[str, Any]:
    body = {
        "params": {"base_model": TINY, "adapter": "lora", **params},
        "dataset": "numbers",
        "repo": "numbers",
    }
    response = api.post("/v2/finetuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _wait(api: httpx.Client, uuid: str, until: Any, timeout: float = 180, what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = dict(api.get(f"/v2/finetuning/jobs/{uuid}").json())
        if until(job):
            return job
        time.sleep(0.05)
    pytest.fail(f"job {uuid} never reached {what or 'the awaited state'}: {job}")


def _stream_frames(stack: WorkerStack, token: str, uuid: str) -> list[dict[str, Any]]:
    url = stack.url.replace("http://", "ws://") + f"/v2/finetuning/jobs/{uuid}/metrics/stream"
    frames = []
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
        for message in ws:
            frames.append(json.loads(message))
    return frames


def _session(stack: WorkerStack) -> Any:
    return stack.app.state.ctx.sessions()


def test_sdk_adapters_create_trains_an_adapter_that_peft_loads(
    live_server_with_worker: WorkerStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shared_model_cache: Path,
) -> None:
    stack = live_server_with_worker
    pb, token = _prepare(stack, tmp_path, monkeypatch)

    adapter = pb.adapters.create(
        config=FinetuningConfig(base_model=TINY, adapter="lora", train_steps=6, learning_rate=5e-3),
        dataset="numbers",
        repo="numbers",
        description="e2e",
    )

    assert (adapter.repo, adapter.tag, adapter.artifact_path) == ("numbers", 1, "numbers/1")
    assert adapter.finetuning_error is None
    frames = _stream_frames(stack, token, str(adapter.finetuning_job_uuid))  # replayed history
    assert [f["data"]["steps"] for f in frames[:-1]] == [1, 2, 3, 4, 5, 6]
    assert all(f["data"]["train_metrics_loss"] > 0 for f in frames[:-1])
    assert frames[-1]["meta"]["is_completed"] and frames[-1]["meta"]["total_steps"] == 6
    assert frames[-1]["data"]["validation_metrics_loss"] is not None  # the final evaluation

    archive = pb.adapters.download("numbers/1", dest=str(tmp_path / "adapter.zip"))
    with zipfile.ZipFile(archive or tmp_path / "adapter.zip") as bundle:
        bundle.extractall(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(shared_model_cache / TINY)
    inputs = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.no_grad():
        base_logits = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        tuned_logits = tuned(inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4


def test_cancel_during_training_stops_within_one_step_and_keeps_the_last_checkpoint(
    live_server_with_worker: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = live_server_with_worker
    _, token = _prepare(stack, tmp_path, monkeypatch)
    api = _api(stack, token)
    job = _start_job(api, train_steps=5000, checkpoint_every_n_steps=3)
    _wait(api, job["uuid"], lambda j: j["stepsDone"] >= 7, what="step 7")

    assert api.post(f"/v2/finetuning/jobs/{job['uuid']}/cancel").json()["status"] == "stopping"
    final = _wait(api, job["uuid"], lambda j: j["status"] in FINAL, what="a final status")

    assert final["status"] == "canceled" and final["stepsDone"] < 5000
    with _session(stack) as session:
        stopping_at = session.scalars(
            select(JobEvent.created_at)
            .join(FinetuningJob, FinetuningJob.id == JobEvent.job_id)
            .where(FinetuningJob.uuid == job["uuid"], JobEvent.kind == JobEventKind.STATUS)
            .where(JobEvent.data["status"].as_string() == "stopping")
        ).one()
        steps_after = session.scalars(
            select(JobMetric.step)
            .join(FinetuningJob, FinetuningJob.id == JobMetric.job_id)
            .where(FinetuningJob.uuid == job["uuid"], JobMetric.created_at > stopping_at)
        ).all()
    # The step under way when the cancel landed may finish; no other step starts.
    assert len(steps_after) <= 1, steps_after
    version = api.get("/v2/repos/numbers/version/1").json()
    assert version["status"] == "canceled" and version["checkpoint"] >= 6
    download = api.get("/v2/repos/numbers/version/1/download")
    assert download.status_code == 200
    (tmp_path / "ckpt.zip").write_bytes(download.content)
    with zipfile.ZipFile(tmp_path / "ckpt.zip") as bundle:
        assert sorted(bundle.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_worker_killed_mid_training_is_replaced_and_the_job_resumes_from_its_checkpoint(
    worker_stack_factory: Any, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = worker_stack_factory("postgres_s3")
    first = stack.new_worker().start()
    _, token = _prepare(stack, tmp_path, monkeypatch)
    api = _api(stack, token)
    job = _start_job(api, train_steps=120, checkpoint_every_n_steps=10)
    _wait(api, job["uuid"], lambda j: j["stepsDone"] >= 12, what="step 12")

    first.kill()
    stack.new_worker().start()
    final = _wait(api, job["uuid"], lambda j: j["status"] in FINAL, timeout=300, what="a final status")

    assert final["status"] == "completed", final["error"]
    assert final["attempt"] == 2 and final["stepsDone"] == 120
    with _session(stack) as session:
        job_id = session.scalars(select(FinetuningJob.id).where(FinetuningJob.uuid == job["uuid"])).one()
        restart = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == JobEventKind.RESTART)
        ).one()
        rows = session.execute(select(JobMetric.step, JobMetric.attempt).where(JobMetric.job_id == job_id))
        written_by = dict(rows.tuples().all())
    resume_step = restart.data["resume_step"]
    assert resume_step >= 10 and resume_step % 10 == 0
    # Steps up to the checkpoint were not trained again; every step after it was, by the new worker.
    assert sorted(written_by) == list(range(1, 121))
    assert {s for s, attempt in written_by.items() if attempt == 1} == set(range(1, resume_step + 1))
    assert "restart-2" in api.get(f"/v2/finetuning/jobs/{job['uuid']}/timeline").json()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A redis-server of this test's own on a free port, which the test can stop and start again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(tmp_path),
    ]
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        state["process"] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def stop() -> None:
        state["process"].terminate()
        state["process"].wait(timeout=10)

    start()
    yield f"redis://127.0.0.1:{port}/0", (start, stop)
    if state["process"].poll() is None:
        stop()


def test_a_job_created_while_the_broker_is_down_stays_queued_and_runs_once_it_is_back(
    worker_stack_factory: Any, own_redis: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker_url, (start_broker, stop_broker) = own_redis
    stack = worker_stack_factory("postgres_s3", broker_url=broker_url)
    stack.new_worker("validate").start()  # the dataset must be connected; no training worker yet
    _, token = _prepare(stack, tmp_path, monkeypatch)
    api = _api(stack, token)
    stop_broker()

    job = _start_job(api, train_steps=3)
    time.sleep(2)  # several sweeps find the broker still down
    assert api.get(f"/v2/finetuning/jobs/{job['uuid']}").json()["status"] == "queued"
    with _session(stack) as session:
        row = session.scalars(select(FinetuningJob).where(FinetuningJob.uuid == job["uuid"])).one()
        assert row.enqueued_at is None

    start_broker()
    stack.new_worker().start()
    final = _wait(api, job["uuid"], lambda j: j["status"] in FINAL, what="a final status")
    assert final["status"] == "completed", final["error"]


def test_deleting_a_version_a_dataset_and_a_repo_deletes_their_blobs_checkpoints_and_token_caches(
    live_server_with_worker: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = live_server_with_worker
    _, token = _prepare(stack, tmp_path, monkeypatch)
    api = _api(stack, token)
    for _ in range(2):
        job = _start_job(api, train_steps=4, checkpoint_every_n_steps=2)
        final = _wait(api, job["uuid"], lambda j: j["status"] in FINAL, what="a final status")
        assert final["status"] == "completed", final["error"]
    store = stack.app.state.ctx.store
    with _session(stack) as session:
        owned = f"tenants/{auth.authenticate(session, token).tenant.uuid}/"
    kinds = {key.split("/")[2] for key in store.list_keys(owned)}
    # uploads/: the marker that keeps the dataset's upload token used up (gc removes it later).
    assert kinds == {"uploads", "datasets", "repos", "jobs"}
    markers = store.list_keys(f"{owned}uploads/")
    assert len(markers) == 1 and markers[0].endswith("/registered"), markers
    assert any("/tokenized/" in key for key in store.list_keys(f"{owned}datasets/"))
    jobs_before = {key.split("/")[3] for key in store.list_keys(f"{owned}jobs/")}
    assert len(jobs_before) == 2

    assert api.delete("/v2/repos/numbers/version/1").status_code == 200
    assert len({key.split("/")[3] for key in store.list_keys(f"{owned}jobs/")}) == 1
    assert api.delete("/v2/datasets/numbers").status_code == 200
    assert store.list_keys(f"{owned}datasets/") == []  # its file and its tokenised caches
    assert api.delete("/v2/repos/numbers").status_code == 200

    assert store.list_keys(owned) == markers


def test_a_worker_of_a_class_trains_the_jobs_placed_on_that_class(
    worker_stack_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = [
        {"name": "big", "device": "cpu", "memory_gib": 64},
        {"name": "small", "device": "cpu", "memory_gib": 4},
    ]
    # Both the control plane and the worker read these settings; only the worker acts on worker_class.
    stack = worker_stack_factory("embedded", worker_classes=classes, worker_class="small")
    stack.new_worker().start()
    _, token = _prepare(stack, tmp_path, monkeypatch)
    api = _api(stack, token)
    job = _start_job(api, train_steps=3, max_seq_length=128)
    assert job["workerClass"] == "small" and job["placement"]["estimate"]["total_gib"] < 4
    final = _wait(api, job["uuid"], lambda j: j["status"] in FINAL, what="a final status")
    assert final["status"] == "completed", final["error"]
    log = stack.workers[0].log_path.read_text()
    assert f"{stack.settings.train_queue}.small" in log  # the queue the training node consumed
