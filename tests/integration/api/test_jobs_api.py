"""Fine-tuning jobs over HTTP on both stacks, without a worker: accept, inspect, cancel, refuse bad input."""

from __future__ import annotations

import json

import pytest
from tests_support import assert_error

ROWS = b"".join(
    json.dumps({"prompt": f"Say {n}.", "completion": f" {n}"}).encode() + b"\n" for n in range(20)
)
TINY = "tiny-random-llama"


def _ready(tenant, dataset: str = "numbers", repo: str = "numbers") -> None:  # type: ignore[no-untyped-def]
    assert tenant.upload_dataset(dataset, "numbers.jsonl", ROWS)["status"] == "connected"
    assert tenant.client.post("/v2/repos", json={"name": repo}).status_code == 200


def _create(tenant, **overrides):  # type: ignore[no-untyped-def]
    body = {"params": {"base_model": TINY, "adapter": "lora", "train_steps": 3}, "dataset": "numbers"}
    body |= {"repo": "numbers"} | overrides
    return tenant.client.post("/v2/finetuning/jobs", json=body)


def test_create_commits_a_queued_job_and_version_and_shows_them(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    response = _create(tenant, description="first try")
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["status"], job["targetRepoName"], job["targetVersionTag"]) == ("queued", "numbers", 1)
    assert (job["baseModel"], job["datasetName"], job["description"]) == (TINY, "numbers", "first try")
    assert job["accelerator"]["id"] and job["totalSteps"] == 3
    # Every default the worker will use is recorded with the job.
    assert job["params"]["rank"] == 16 and job["params"]["learning_rate"] == 2e-4
    assert job["params"]["lr_scheduler"]["type"] == "linear" and job["continueFromVersion"] is None

    assert tenant.client.get(f"/v2/finetuning/jobs/{job['uuid']}").json()["uuid"] == job["uuid"]
    listed = tenant.client.get("/v2/finetuning/jobs").json()
    assert listed["count"] == 1 and listed["data"][0]["uuid"] == job["uuid"]
    timeline = tenant.client.get(f"/v2/finetuning/jobs/{job['uuid']}/timeline").json()
    # No worker classes here: the default queue. Estimated where this control plane can read the
    # built-in's config (a worker sharing its model cache built it earlier in the session), else not.
    assert list(timeline) == ["queued", "placement"]
    assert "default train queue" in timeline["placement"]["detail"]
    estimate = job["placement"]["estimate"]
    assert job["workerClass"] is None
    assert ("estimate unavailable" in timeline["placement"]["detail"]) == (estimate is None)
    version = tenant.client.get("/v2/repos/numbers/version/1").json()
    assert (version["status"], version["adapterPath"]) == ("queued", None)
    assert version["finetuningJob"] == {"uuid": job["uuid"], "error": None}
    assert (version["parentVersion"], version["autoconfig"], version["qualityReport"]) == (None, {}, {})
    assert tenant.client.get(f"/v2/finetuning/jobs/{job['uuid']}/metrics").json() == {"data": [], "count": 0}


def test_new_methods_are_accepted_and_scheduler_names_are_stored_as_objects(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    params = {"base_model": TINY, "adapter": "dora", "lr_scheduler": "cosine", "optimizer": "sgd"}
    dora = _create(tenant, params=params)
    assert dora.status_code == 200, dora.text
    assert dora.json()["params"]["lr_scheduler"] == {"type": "cosine", "num_cycles": 0.5, "min_lr_ratio": 0.0}
    assert dora.json()["params"]["optimizer"]["type"] == "sgd"
    full = _create(tenant, params={"base_model": TINY, "adapter": "full", "micro_batch_size": 2})
    assert full.status_code == 200, full.text
    # No effective_batch_size given: the default 16 rows a step, so 18 training rows make 2 steps an epoch.
    assert (full.json()["params"]["learning_rate"], full.json()["totalSteps"]) == (2e-5, 3 * 2)
    versions = tenant.client.get("/v2/repos/numbers").json()["versions"]
    assert [(v["tag"], v["adapterType"]) for v in versions] == [(1, "dora"), (2, "full")]


def test_cancel_of_a_queued_job_is_final_and_a_second_cancel_is_a_409(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    uuid = _create(tenant).json()["uuid"]
    canceled = tenant.client.post(f"/v2/finetuning/jobs/{uuid}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert tenant.client.get("/v2/repos/numbers/version/1").json()["status"] == "canceled"
    assert_error(tenant.client.post(f"/v2/finetuning/jobs/{uuid}/cancel"), 409, "already canceled")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"base_model": "gpt-17"}, "params.base_model: gpt-17 is not available on this cluster"),
        ({"base_model": TINY, "adapter": "qlora-9"}, "params.adapter: unknown adapter"),
        (
            {"base_model": TINY, "adapter": "turbo_lora", "speculator_heads": 9},
            "params.speculator_heads: speculator_heads must be between 1 and 8",
        ),
        ({"base_model": TINY, "rank": 0}, "params.rank"),
        ({"base_model": TINY, "learning_rate": -1}, "params.learning_rate"),
        ({"base_model": TINY, "epochs": "many"}, "params.epochs"),
        ({"base_model": TINY, "lr_scheduler": {"type": "cosine", "warmup": 3}}, "params.lr_scheduler"),
        ({"base_model": TINY, "enable_dreams": True}, "params.enable_dreams: unknown field"),
        ({"adapter": "lora"}, "params.base_model: required"),
        ({"base_model": TINY, "rank": "high"}, "params.rank: "),
        # Fields that size the work have upper bounds.
        ({"base_model": TINY, "train_steps": 10**9}, "params.train_steps: Input should be less than"),
        ({"base_model": TINY, "max_seq_length": 10**7}, "params.max_seq_length: Input should be less than"),
        ({"base_model": TINY, "keep_n_checkpoints": 10**6}, "params.keep_n_checkpoints: Input should be"),
        ({"base_model": TINY, "seed": 2**64}, "params.seed: Input should be less than or equal"),
        # Checks across fields name the field they are about, not an empty location.
        (
            {"base_model": TINY, "adapter": "full", "quantization_bits": 4},
            "params.quantization_bits: a 4-bit base cannot be trained directly",
        ),
        (
            {"base_model": TINY, "effective_batch_size": 16, "gradient_accumulation_steps": 2},
            "params.gradient_accumulation_steps (2) disagrees with effective_batch_size (16)",
        ),
    ],
)
def test_bad_params_are_a_422_naming_the_field(tenant, params, fragment) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    assert_error(_create(tenant, params=params), 422, fragment)
    assert tenant.client.get("/v2/finetuning/jobs").json()["count"] == 0  # nothing half-created


def test_missing_dataset_repo_and_parent_version_are_4xx_naming_the_field(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    assert_error(_create(tenant, dataset="nope"), 404, "dataset: 'nope' not found")
    assert_error(_create(tenant, repo="nope"), 404, "repo 'nope' not found")
    assert_error(
        _create(tenant, continueFromVersion="numbers/1"), 404, "continueFromVersion: adapter version"
    )
    assert_error(_create(tenant, continueFromVersion="numbers"), 422, "continueFromVersion: 'numbers'")
    assert_error(tenant.client.post("/v2/finetuning/jobs", json={"params": {}}), 422, "dataset")


def test_a_dataset_that_failed_validation_is_refused_with_its_error(tenant) -> None:  # type: ignore[no-untyped-def]
    assert tenant.upload_dataset("broken", "broken.jsonl", b'{"completion": "a"}\n')["status"] == "errored"
    tenant.client.post("/v2/repos", json={"name": "numbers"})
    assert_error(_create(tenant, dataset="broken"), 422, "dataset: 'broken' is errored, not connected")


def test_another_tenants_dataset_repo_and_job_are_404(tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    uuid = _create(tenant).json()["uuid"]
    other_tenant.client.post("/v2/repos", json={"name": "numbers"})
    assert_error(_create(other_tenant), 404, "dataset")
    assert other_tenant.upload_dataset("numbers", "numbers.jsonl", ROWS)["status"] == "connected"
    assert_error(_create(other_tenant, repo="elsewhere"), 404, "repo")
    for path in ("", "/timeline", "/metrics", "/metrics/stream"):
        assert_error(other_tenant.client.get(f"/v2/finetuning/jobs/{uuid}{path}"), 404, "not found")
    assert_error(other_tenant.client.post(f"/v2/finetuning/jobs/{uuid}/cancel"), 404, "not found")
    assert tenant.client.get(f"/v2/finetuning/jobs/{uuid}").json()["status"] == "queued"


def test_cost_estimate_answers_a_json_object_whatever_it_is_sent(tenant) -> None:  # type: ignore[no-untyped-def]
    _ready(tenant)
    path = "/v2/finetuning/jobs/cost-estimate"
    body = {"baseModel": TINY, "datasetName": "numbers", "epochs": 2, "trainSteps": None}
    estimate = tenant.client.request("GET", path, json=body)
    # 20 rows, 2 held out for evaluation, 16 per step: 2 steps an epoch.
    assert estimate.status_code == 200 and estimate.json()["totalSteps"] == 4
    assert estimate.json()["estimatedCost"] == 0
    for odd in (None, {"baseModel": "gpt-17"}, {"baseModel": TINY, "datasetName": "missing"}, [1, 2]):
        response = tenant.client.request("GET", path, json=odd)
        assert response.status_code == 200 and response.json()["totalSteps"] is None


def test_base_models_are_listed(tenant) -> None:  # type: ignore[no-untyped-def]
    names = [m["name"] for m in tenant.client.get("/v2/base-models").json()["data"]]
    assert names[:2] == ["smollm2-135m", TINY]


def test_a_non_finite_loss_streams_as_null_in_strict_json_and_once(tenant, api_app) -> None:  # type: ignore[no-untyped-def]
    from app.db import FinetuningJob, JobStatus
    from app.db.session import transaction
    from app.services import jobs

    _ready(tenant)
    uuid = _create(tenant).json()["uuid"]
    with transaction(api_app.app.state.ctx.sessions) as session:
        job = session.query(FinetuningJob).filter_by(uuid=uuid).one()
        jobs.start_attempt(session, job, worker_id="w", lease_seconds=60)
        jobs.record_metric(session, job, 1, train_loss=float("nan"), learning_rate=float("inf"))
        jobs.record_metric(session, job, 2, train_loss=0.5)
        jobs.transition(session, job, JobStatus.ERRORED, error="loss is NaN")

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON (a browser's JSON.parse refuses the frame)")

    body = tenant.client.get(f"/v2/finetuning/jobs/{uuid}/metrics/stream").text
    lines = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    frames = [json.loads(line, parse_constant=strict) for line in lines]
    assert [f["data"]["steps"] for f in frames] == [1, 2, 2]  # the last is the completion frame
    assert (frames[0]["data"]["train_metrics_loss"], frames[0]["data"]["learning_rate"]) == (None, None)
    assert frames[-1]["meta"]["is_completed"] and frames[-1]["meta"]["status"] == "errored"


def test_a_page_offset_past_any_table_is_a_422_naming_offset_not_a_database_error(tenant) -> None:  # type: ignore[no-untyped-def]
    # Found by the fuzzer: 2**63 overflowed SQLite's integer and PostgreSQL's bigint (a 500).
    assert_error(tenant.client.get(f"/v2/finetuning/jobs?offset={2**63}"), 422, "offset")
    assert tenant.client.get(f"/v2/finetuning/jobs?offset={2**31 - 1}").json()["data"] == []


def test_a_job_id_that_is_no_uuid_is_a_404_and_one_with_a_nul_a_400(tenant) -> None:  # type: ignore[no-untyped-def]
    # Found by the fuzzer: PostgreSQL refuses a NUL in a text parameter, which surfaced as a 500.
    for path in ("", "/timeline", "/metrics", "/metrics/stream"):
        assert_error(tenant.client.get(f"/v2/finetuning/jobs/not-a-uuid{path}"), 404, "not found")
        assert_error(tenant.client.get(f"/v2/finetuning/jobs/a%00b{path}"), 400, "NUL")
    assert_error(tenant.client.post("/v2/finetuning/jobs/not-a-uuid/cancel"), 404, "not found")
    assert_error(tenant.client.post("/v2/finetuning/jobs/a%00b/cancel"), 400, "NUL")


def test_task_metrics_merge_per_step_and_stream_under_the_predibase_sdks_keys(tenant, api_app) -> None:  # type: ignore[no-untyped-def]
    from app.db import FinetuningJob, JobStatus
    from app.db.session import transaction
    from app.services import jobs

    _ready(tenant)
    uuid = _create(tenant).json()["uuid"]
    with transaction(api_app.app.state.ctx.sessions) as session:
        job = session.query(FinetuningJob).filter_by(uuid=uuid).one()
        jobs.start_attempt(session, job, worker_id="w", lease_seconds=60)
        rewards = {"reward_mean": 0.5, "reward_std": 0.25, "reward/fmt": 0.75, "reward/len": -0.25}
        jobs.record_metric(session, job, 1, train_loss=0.3, task_metrics=rewards | {"train_accuracy": 0.5})
        # The step's evaluation merges into its row, task metrics key by key.
        jobs.record_metric(session, job, 1, eval_loss=0.2, task_metrics={"eval_accuracy": 0.875})
        jobs.transition(session, job, JobStatus.ERRORED, error="stopped by the test")

    rows = tenant.client.get(f"/v2/finetuning/jobs/{uuid}/metrics").json()["data"]
    assert rows[0]["taskMetrics"] == rewards | {"train_accuracy": 0.5, "eval_accuracy": 0.875}
    body = tenant.client.get(f"/v2/finetuning/jobs/{uuid}/metrics/stream").text
    frame = json.loads(next(line for line in body.splitlines() if line.startswith("data: "))[6:])["data"]
    expected = {"total_reward": 0.5, "total_reward_std": 0.25, "fmt": 0.75, "len": -0.25}
    assert frame["grpo_train_rewards"] == expected
    assert (frame["train_metrics_accuracy"], frame["validation_metrics_accuracy"]) == (0.5, 0.875)
