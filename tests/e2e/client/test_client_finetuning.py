"""The thin client trains adapters on a live server with a real Celery worker, over real HTTP."""

from __future__ import annotations

import json
import math
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import ctrl_c_raises
from tuneforge import (
    ConflictError,
    Dataset,
    FinetuningCanceledError,
    FinetuningConfig,
    NotFoundError,
    Tuneforge,
    ValidationError,
)

pytestmark = pytest.mark.e2e

CONFIG = FinetuningConfig(
    base_model="tiny-random-llama",
    adapter="lora",
    train_steps=4,
    micro_batch_size=2,
    effective_batch_size=2,
    checkpoint_every_n_steps=2,
)
# Long enough that the job is still training when the test interrupts or cancels it.
LONG_CONFIG = {**CONFIG.model_dump(exclude_unset=True), "train_steps": 100_000}
PAIRS = [
    ("What is 2+2?", "4"),
    ("Capital of France?", "Paris"),
    ("Opposite of hot?", "cold"),
    ("Hi", "Hello"),
]


@pytest.fixture
def pb(live_server_with_worker) -> Iterator[Tuneforge]:  # type: ignore[no-untyped-def]
    token = live_server_with_worker.mint_token(f"t-{secrets.token_hex(4)}")
    with Tuneforge(api_token=token, base_url=live_server_with_worker.url, poll_interval=0.2) as client:
        yield client


@pytest.fixture
def dataset(pb: Tuneforge, tmp_path: Path) -> Dataset:
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS * 4]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return pb.datasets.from_file(path, name="qa")


def test_adapters_create_trains_a_completed_version_with_live_progress(
    pb: Tuneforge, dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    pb.repos.create("e2e-lora", exists_ok=True)
    version = pb.adapters.create(config=CONFIG, dataset=dataset, repo="e2e-lora", description="four steps")
    assert (version.id, version.status, version.base_model) == (
        "e2e-lora/1",
        "completed",
        "tiny-random-llama",
    )
    assert version.finetuning_job.uuid and version.finetuning_job.error is None
    err = capsys.readouterr().err
    assert "4/4" in err and "train_loss=" in err, err  # the bar reached the end, with a loss
    assert re.search(r"tok/s=[\d,]+\]", err) and " elapsed, ETA " in err, err  # measured throughput

    config = pb.adapters.get_config(version.id)  # what the worker trained, defaults resolved
    assert (config.base_model, config.train_steps, config.micro_batch_size) == ("tiny-random-llama", 4, 2)
    assert config.target_modules  # None in the request; the worker recorded the modules it chose

    job = pb.finetuning.jobs.get(version.finetuning_job.uuid)
    assert (job.status, job.adapter_id, job.steps_done, job.total_steps) == ("completed", version.id, 4, 4)
    assert job.params["train_steps"] == 4 and job.params["base_model"] == "tiny-random-llama"
    assert job.description == "four steps"


def test_finetuning_jobs_list_get_timeline_metrics(pb: Tuneforge, dataset: Dataset) -> None:
    pb.repos.create("e2e-jobs", exists_ok=True)
    job = pb.finetuning.jobs.create(
        config=CONFIG, dataset="qa", repo="e2e-jobs", watch=True, show_progress=False
    )
    assert job.status == "completed" and job.raise_for_status() is job
    assert [j.uuid for j in pb.finetuning.jobs.list()] == [job.uuid]
    assert pb.finetuning.jobs.list(limit=1, offset=1) == []
    assert pb.finetuning.jobs.get(job).uuid == job.uuid

    timeline = pb.finetuning.jobs.timeline(job.uuid)
    assert {"queued", "training", "completed"} <= set(timeline)
    assert timeline["queued"].started_at and timeline["completed"].started_at
    assert timeline["queued"].started_at <= timeline["completed"].started_at

    metrics = pb.finetuning.jobs.metrics(job.uuid)
    assert [m.step for m in metrics] == [1, 2, 3, 4]
    assert all(m.train_loss is not None and math.isfinite(m.train_loss) for m in metrics)


def test_a_bad_field_in_a_dict_config_raises_validation_error_without_a_request(
    pb: Tuneforge, dataset: Dataset
) -> None:
    bad = {**CONFIG.model_dump(exclude_unset=True), "learning_rate": -1.0}
    with pytest.raises(ValidationError, match="learning_rate") as caught:
        pb.adapters.create(config=bad, dataset=dataset, repo="never")
    assert caught.value.status is None  # refused by the client, not answered by the server
    assert pb.finetuning.jobs.list() == []
    with pytest.raises(NotFoundError):
        pb.repos.get("never")


def test_an_unknown_dataset_is_refused_by_the_server(pb: Tuneforge) -> None:
    pb.repos.create("e2e-missing", exists_ok=True)
    with pytest.raises(NotFoundError) as caught:
        pb.adapters.create(config=CONFIG, dataset="no-such-dataset", repo="e2e-missing")
    assert caught.value.status == 404


def test_wait_false_returns_the_queued_version_and_watch_follows_it(pb: Tuneforge, dataset: Dataset) -> None:
    pb.repos.create("e2e-nowait", exists_ok=True)
    version = pb.adapters.create(config=CONFIG, dataset=dataset, repo="e2e-nowait", wait=False)
    assert version.id == "e2e-nowait/1" and version.status in ("queued", "training")
    assert version.finetuning_job.uuid
    job = pb.finetuning.jobs.watch(version.finetuning_job.uuid, show_progress=False)
    assert (job.status, job.steps_done) == ("completed", 4)
    assert pb.adapters.get(version.id).status == "completed"


def test_adapters_cancel_stops_the_versions_job(pb: Tuneforge, dataset: Dataset) -> None:
    pb.repos.create("e2e-cancel", exists_ok=True)
    version = pb.adapters.create(config=LONG_CONFIG, dataset=dataset, repo="e2e-cancel", wait=False)
    assert pb.adapters.cancel(version.id).status in ("queued", "stopping", "canceled")
    job = pb.finetuning.jobs.watch(version.finetuning_job.uuid or "", show_progress=False)
    assert job.status == "canceled"
    with pytest.raises(FinetuningCanceledError, match="e2e-cancel/1"):
        job.raise_for_status()
    with pytest.raises(ConflictError):
        pb.finetuning.jobs.cancel(job)


def test_ctrl_c_while_waiting_detaches_without_canceling(
    pb: Tuneforge, dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    pb.repos.create("e2e-detach", exists_ok=True)
    # A real SIGINT to the main thread, as Ctrl-C sends: it also breaks a blocking read of the stream.
    # Sent once the job exists (plus a second for the client to be waiting on it), never on a fixed
    # timer: on a loaded machine a timer can fire while the create request is still in flight.
    main, done = threading.main_thread().ident, threading.Event()

    def interrupt_once_the_job_exists() -> None:
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            if pb.finetuning.jobs.list():
                done.wait(1.0)
                if not done.is_set():
                    signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
                return
            time.sleep(0.1)

    interrupter = threading.Thread(target=interrupt_once_the_job_exists, daemon=True)
    try:
        with ctrl_c_raises(), pytest.raises(KeyboardInterrupt):
            interrupter.start()
            pb.adapters.create(config=LONG_CONFIG, dataset=dataset, repo="e2e-detach")
    finally:
        done.set()
        interrupter.join()
    (job,) = pb.finetuning.jobs.list()
    try:
        assert job.status in ("queued", "training")  # still running: detaching canceled nothing
        err = capsys.readouterr().err
        assert f'pb.finetuning.jobs.watch("{job.uuid}")' in err
        assert 'pb.adapters.cancel("e2e-detach/1")' in err
    finally:
        # Free the worker for the next test.
        pb.finetuning.jobs.cancel(job)
        assert pb.finetuning.jobs.watch(job, show_progress=False).status == "canceled"
