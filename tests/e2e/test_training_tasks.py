"""The tasks beyond SFT through the real Predibase SDK, a live control plane and a real Celery worker:
`GRPOConfig` with reward functions (one of them hostile) and `ClassificationConfig`, served by `/classify`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from predibase import ClassificationConfig, GRPOConfig, Predibase
from predibase.config import SamplingParamsConfig
from websockets.sync.client import connect
from worker_fixtures import WorkerStack

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"


# Reward functions as a tenant writes them: module-level, so the SDK can send their source.
def short_answer(prompt, completion, example):  # type: ignore[no-untyped-def]
    return 1.0 if len(completion) < 40 else 0.0


def mentions_the_word(prompt, completion, example):  # type: ignore[no-untyped-def]
    return float(example["word"] in completion)


def steals_credentials(prompt, completion, example):  # type: ignore[no-untyped-def]
    import os

    # The worker holds database and storage credentials; the sandbox's environment is empty.
    return float(len(os.environ["TUNEFORGE_DATABASE_URL"]))


def _sdk(stack: WorkerStack, monkeypatch: pytest.MonkeyPatch) -> tuple[Predibase, str]:
    token = stack.mint_token(f"t-{time.monotonic_ns()}")
    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", token)
    return Predibase(), token


def _upload(pb: Predibase, tmp_path: Path, name: str, rows: list[dict[str, Any]]) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pb.datasets.from_file(path, name=name)


def _frames(stack: WorkerStack, token: str, uuid: str) -> list[dict[str, Any]]:
    url = stack.url.replace("http://", "ws://") + f"/v2/finetuning/jobs/{uuid}/metrics/stream"
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
        return [json.loads(message) for message in ws]


def test_grpo_config_trains_with_sandboxed_reward_functions_and_streams_their_rewards(
    live_server_with_worker: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = live_server_with_worker
    pb, token = _sdk(stack, monkeypatch)
    words = ["apple", "river", "stone", "cloud"]
    _upload(pb, tmp_path, "prompts", [{"prompt": f"Say the word {w}.", "word": w} for w in words * 3])
    pb.repos.create(name="grpo", exists_ok=True)

    config = GRPOConfig(
        base_model=TINY,
        adapter="lora",
        train_steps=2,
        effective_batch_size=4,
        num_generations=2,
        sampling_params=SamplingParamsConfig(max_tokens=6),
        reward_fns=[short_answer, mentions_the_word, steals_credentials],
    )
    adapter = pb.adapters.create(config=config, dataset="prompts", repo="grpo", description="grpo e2e")

    assert adapter.finetuning_error is None
    frames = _frames(stack, token, str(adapter.finetuning_job_uuid))
    rewards = [f["data"]["grpo_train_rewards"] for f in frames[:-1]]
    assert [f["data"]["steps"] for f in frames[:-1]] == [1, 2]
    for step in rewards:
        assert {"total_reward", "short_answer", "mentions_the_word", "steals_credentials"} <= set(step)
        assert step["steals_credentials"] == 0.0  # it raised KeyError in the sandbox: scored 0
    metrics = httpx.get(
        f"{stack.url}/v2/finetuning/jobs/{adapter.finetuning_job_uuid}/metrics",
        headers={"Authorization": f"Bearer {token}"},
    ).json()["data"]
    # Every call of the hostile function failed, and the failures are counted per step.
    assert all(row["taskMetrics"]["reward_failures/steals_credentials"] > 0 for row in metrics)
    version = pb.adapters.get("grpo/1")
    assert version.tag == 1


def test_classification_config_trains_a_classifier_with_a_confusion_matrix(
    live_server_with_worker: WorkerStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = live_server_with_worker
    pb, token = _sdk(stack, monkeypatch)
    rows = [{"text": f"{word} movie number {n}", "label": label} for n in range(8) for word, label in
            (("good", "positive"), ("bad", "negative"))]  # fmt: skip
    _upload(pb, tmp_path, "reviews", rows)
    pb.repos.create(name="sentiment", exists_ok=True)

    config = ClassificationConfig(base_model=TINY, adapter="lora", train_steps=4, learning_rate=1e-2)
    adapter = pb.adapters.create(config=config, dataset="reviews", repo="sentiment", description="cls e2e")

    assert adapter.finetuning_error is None
    frames = _frames(stack, token, str(adapter.finetuning_job_uuid))
    assert frames[-1]["meta"]["is_completed"]
    assert any(f["data"].get("validation_metrics_accuracy") is not None for f in frames)
    version = httpx.get(
        f"{stack.url}/v2/repos/sentiment/version/1", headers={"Authorization": f"Bearer {token}"}
    ).json()
    report = version["qualityReport"]
    assert report["task"] == "classification"
    assert sorted(report["confusion_matrix"]["labels"]) == ["negative", "positive"]

    # Served by a deployment of the base model, beside any other adapter: LoRAX's /classify routes.
    from tuneforge import Tuneforge

    tuneforge = Tuneforge(api_token=token, base_url=stack.url)
    tuneforge.deployments.create("classifier", config={"baseModel": TINY})
    url = f"{stack.url}/{_tenant(stack, token)}/deployments/v2/llms/classifier"
    headers = {"Authorization": f"Bearer {token}"}
    one = httpx.post(f"{url}/classify", json={"inputs": "good movie", "adapter_id": "sentiment/1"},
                     headers=headers, timeout=120)  # fmt: skip
    assert one.status_code == 200, one.text
    [entity] = one.json()  # LoRAX's entities: one, spanning the text
    assert entity["entity_group"] in {"positive", "negative"} and 0 <= entity["score"] <= 1
    batch = httpx.post(f"{url}/classify_batch", json={"inputs": ["good film", "bad film"], "adapter_id":
                       "sentiment/1"}, headers=headers, timeout=120)  # fmt: skip
    assert batch.status_code == 200 and [len(entities) for entities in batch.json()] == [1, 1]
    # A generative request names no classifier: /classify says what to do instead.
    assert httpx.post(f"{url}/classify", json={"inputs": "x"}, headers=headers, timeout=60).status_code == 400
    tuneforge.deployments.delete("classifier")


def _tenant(stack: WorkerStack, token: str) -> str:
    current = httpx.get(f"{stack.url}/users/current", headers={"Authorization": f"Bearer {token}"}).json()
    return str(current["tenant"]["shortCode"])
