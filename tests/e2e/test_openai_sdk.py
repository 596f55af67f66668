"""The official `openai` SDK pointed at tuneforge with only `base_url` changed: upload a JSONL file,
fine-tune tiny-random-llama on a real worker, follow the job's events, then chat with the fine-tuned
model through the control plane's own `/v1/chat/completions`."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
from worker_fixtures import WorkerStack

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Repeat the number {n}."},
            {"role": "assistant", "content": f"{n} {n} {n}"},
        ]
    }
    for n in range(24)
]
FINAL = {"succeeded", "failed", "cancelled"}


def _follow(client: openai.OpenAI, job_id: str, timeout: float = 240) -> tuple[object, list[str]]:
    """Poll the job as an SDK user does, listing its events meanwhile; the final job and the statuses seen."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        seen.append(job.status)
        events = client.fine_tuning.jobs.list_events(job_id, limit=50).data
        assert events == sorted(events, key=lambda e: e.created_at, reverse=True)
        if job.status in FINAL:
            return job, seen
        time.sleep(0.1)
    pytest.fail(f"{job_id} did not finish in {timeout}s; statuses {seen[-5:]}")


def test_fine_tune_with_the_openai_sdk_and_chat_with_the_result(live_server_with_worker: WorkerStack) -> None:
    stack = live_server_with_worker
    token = stack.mint_token(f"t-oa-{time.monotonic_ns()}")
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=token, max_retries=0)
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    uploaded = client.files.create(file=("repeat.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert uploaded.status == "processed"

    created = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=uploaded.id,
        suffix="repeat",
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}
            },
        },
    )
    job, seen = _follow(client, created.id)
    assert job.status == "succeeded", job.error  # type: ignore[attr-defined]
    assert "running" in seen or "queued" in seen
    assert job.fine_tuned_model == "repeat/1" and job.finished_at is not None  # type: ignore[attr-defined]
    assert job.trained_tokens  # type: ignore[attr-defined]

    events = list(client.fine_tuning.jobs.list_events(created.id, limit=3))  # every page, via `after`
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert steps and steps == sorted(steps, reverse=True) and steps[-1] == 1
    assert "succeeded" in events[0].message or any("succeeded" in e.message for e in events[:3])
    checkpoints = client.fine_tuning.jobs.checkpoints.list(created.id).data
    assert all(c.fine_tuned_model_checkpoint.startswith("repeat/1@") for c in checkpoints)

    # The fine-tuned model is served by a deployment of its base model: the tenant has none, so the first
    # request creates one with the defaults and starts it.
    assert "repeat/1" in [m.id for m in client.models.list()]
    assert client.models.retrieve("repeat/1").owned_by != "tuneforge"  # the tenant's own model
    chat = client.chat.completions.create(
        model="repeat/1",
        messages=[{"role": "user", "content": "Repeat the number 3."}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.completion_tokens == 5
    streamed = client.chat.completions.create(
        model="repeat/1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    listed = httpx.get(stack.url + "/v2/deployments", headers={"Authorization": f"Bearer {token}"}).json()
    assert TINY in [d["name"] for d in listed["data"]]

    # DPO on the same base, from OpenAI's preference JSONL: the second job, and its model answers too.
    # Its held-out pairs are a validation file of their own.
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"Repeat the number {n}."}]},
            "preferred_output": [{"role": "assistant", "content": f"{n} {n} {n}"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        for n in range(20)
    ]

    def pairs_file(name: str, rows: list[dict[str, object]]) -> str:
        data = "".join(json.dumps(p) + "\n" for p in rows).encode()
        return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id

    preference, held_out = pairs_file("pairs.jsonl", pairs[:16]), pairs_file("held-out.jsonl", pairs[16:])
    dpo = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=preference,
        validation_file=held_out,
        suffix="prefer",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2}}},
    )
    job, seen = _follow(client, dpo.id)
    assert job.status == "succeeded", job.error  # type: ignore[attr-defined]
    assert job.validation_file == held_out  # type: ignore[attr-defined]
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(dpo.id, limit=50) if e.type == "metrics"]
    # 16 pairs, 2 a step: 8 steps, as none of them is held out (a tenth would be, without the file).
    assert max(m["step"] for m in metrics) == 8  # type: ignore[index]
    assert any(m["valid_loss"] is not None for m in metrics)  # type: ignore[index]
    assert job.fine_tuned_model == "prefer/1" and job.method.type == "dpo"  # type: ignore[attr-defined]
    assert job.method.dpo.hyperparameters.beta == 0.2  # type: ignore[attr-defined]
    answer = client.chat.completions.create(
        model="prefer/1", messages=[{"role": "user", "content": "Repeat the number 5."}], max_tokens=3
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
