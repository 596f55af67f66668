"""Datasets of the tasks beyond SFT over HTTP on both stacks: preference, classification and prompts-only
files are validated on upload, bad ones end errored and refuse jobs, and a job's task must fit its data."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from tests_support import assert_error

TINY = "tiny-random-llama"
REWARD = base64.b64encode(b"def exact(prompt, completion, example):\n    return 1.0\n").decode()


def _jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


PAIRS = _jsonl(*({"prompt": f"{n}+{n}?", "chosen": str(2 * n), "rejected": str(2 * n + 1)} for n in range(8)))
OPENAI_PAIRS = _jsonl(
    *(
        {
            "input": {"messages": [_turn("user", f"{n}+{n}?")]},
            "preferred_output": [_turn("assistant", str(2 * n))],
            "non_preferred_output": [_turn("assistant", str(2 * n + 1))],
        }
        for n in range(8)
    )
)
LABELLED = _jsonl(*({"text": f"review {n}", "label": "positive" if n % 2 else "negative"} for n in range(8)))
PROMPTS = _jsonl(*({"prompt": f"{n}+{n}?", "answer": 2 * n} for n in range(8)))
COMPLETIONS = _jsonl(*({"prompt": f"Say {n}.", "completion": f" {n}"} for n in range(8)))
TEXTS = _jsonl(*({"text": f"document {n}"} for n in range(8)))


@pytest.mark.parametrize(
    ("data", "kind"),
    [(PAIRS, "preference"), (OPENAI_PAIRS, "preference"), (LABELLED, "classification"), (PROMPTS, "prompt")],
)
def test_task_datasets_connect_with_their_kind(tenant, data: bytes, kind: str) -> None:  # type: ignore[no-untyped-def]
    body = tenant.upload_dataset("good", "good.jsonl", data)
    assert (body["status"], body["format"], body["rowCount"], body["lastError"]) == (
        "connected",
        kind,
        8,
        None,
    )
    lengths = tenant.client.get("/v2/datasets/good/lengths")
    assert lengths.status_code == 200 and lengths.json()["rows"] == 8 and lengths.json()["max"] > 0


# Each hostile or broken file of a new kind: errored with a message naming the rows and the fix, and a
# job on it is a 422 that repeats that message.
BAD_FILES = {
    "pairs-without-prompts": (
        _jsonl(
            {"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"}
        ),
        "1 row has no prompt (an empty 'prompt' and no 'messages') (line 1)",
    ),
    "pairs-with-the-same-answers": (
        _jsonl({"prompt": "q", "chosen": "a", "rejected": "a"}),
        "1 row has the same answer as 'chosen' and 'rejected' (line 1)",
    ),
    "pairs-answered-by-the-user": (
        _jsonl({"prompt": "q", "chosen": [_turn("user", "a")], "rejected": "b"}),
        "line 1, in 'chosen': message 1 has role 'user'",
    ),
    "half-a-pair": (_jsonl({"prompt": "q", "chosen": "a"}), "there is no 'rejected' column"),
    "openai-input-not-an-object": (
        _jsonl({"input": "q", "preferred_output": [], "non_preferred_output": []}),
        "line 1: 'input' is not valid JSON",
    ),
    "openai-without-input-messages": (
        _jsonl({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}),
        "'input.messages' must be a non-empty list",
    ),
    "labels-of-one-class": (
        _jsonl({"text": "a", "label": "spam"}, {"text": "b", "label": "spam"}),
        "every training row has label 'spam'; a classifier needs at least two classes",
    ),
    "float-labels": (
        _jsonl({"text": "a", "label": 1.0}, {"text": "b", "label": 0}),
        "1 row has a 'label' that is a number (line 1)",
    ),
    "missing-labels": (
        _jsonl({"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}),
        "1 row has no 'label' (line 2)",
    ),
    "empty-prompts": (_jsonl({"prompt": "q"}, {"prompt": " "}), "1 row has an empty 'prompt' (line 2)"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_task_files_end_errored_and_refuse_jobs_naming_the_problem(tenant, name: str) -> None:  # type: ignore[no-untyped-def]
    data, fragment = BAD_FILES[name]
    body = tenant.upload_dataset(name, f"{name}.jsonl", data)
    assert body["status"] == "errored" and fragment in body["lastError"], body["lastError"]
    assert tenant.client.post("/v2/repos", json={"name": "r"}).status_code == 200
    job = {"params": {"base_model": TINY, "train_steps": 3}, "dataset": name, "repo": "r"}
    assert_error(tenant.client.post("/v2/finetuning/jobs", json=job), 422, fragment)


def _job(tenant, dataset: str, data: bytes, **params: Any):  # type: ignore[no-untyped-def]
    assert tenant.upload_dataset(dataset, f"{dataset}.jsonl", data)["status"] == "connected"
    if tenant.client.get("/v2/repos/r").status_code == 404:
        assert tenant.client.post("/v2/repos", json={"name": "r"}).status_code == 200
    body = {"params": {"base_model": TINY, "adapter": "lora", "train_steps": 3, **params}}
    return tenant.client.post("/v2/finetuning/jobs", json=body | {"dataset": dataset, "repo": "r"})


@pytest.mark.parametrize(
    ("data", "task", "fragments"),
    [
        (
            COMPLETIONS,
            "dpo",
            [
                "params.task: a 'dpo' job cannot train on dataset 'data', a prompt + completion dataset",
                "task 'dpo' needs 'prompt' (or 'messages') + 'chosen' + 'rejected'",
                "or set params.task to 'sft' or 'continued_pretraining' or 'grpo'",
            ],
        ),
        (
            TEXTS,
            "classification",
            [
                "a 'classification' job cannot train on dataset 'data', a text dataset",
                "needs 'text' + 'label'",
            ],
        ),
        (
            PROMPTS,
            "sft",
            [
                "a 'sft' job cannot train on dataset 'data', a prompts-only dataset",
                "(a 'prompt' column and no 'completion')",
                "task 'sft' needs 'prompt' + 'completion'",
                "or set params.task to 'grpo'",
            ],
        ),
        (PAIRS, "sft", ["a preference-pair dataset", "or set params.task to 'dpo'"]),
        (LABELLED, "grpo", ["a 'grpo' job cannot train on dataset 'data', a classification (text + label)"]),
    ],
)
def test_a_job_whose_task_does_not_fit_its_dataset_is_a_422(
    tenant, data: bytes, task: str, fragments: list[str]
) -> None:  # type: ignore[no-untyped-def]
    extra = {"reward_fns": {"functions": {"exact": {"encodedFn": REWARD}}}} if task == "grpo" else {}
    response = _job(tenant, "data", data, task=task, **extra)
    for fragment in fragments:
        assert_error(response, 422, fragment)
    assert tenant.client.get("/v2/finetuning/jobs").json()["count"] == 0


@pytest.mark.parametrize(
    ("data", "task"),
    [(PAIRS, "dpo"), (OPENAI_PAIRS, "dpo"), (LABELLED, "classification"), (PROMPTS, "grpo"), (TEXTS, "sft")],
)
def test_a_job_whose_task_fits_its_dataset_is_queued(tenant, data: bytes, task: str) -> None:  # type: ignore[no-untyped-def]
    extra = {"reward_fns": {"functions": {"exact": {"encodedFn": REWARD}}}} if task == "grpo" else {}
    response = _job(tenant, "data", data, task=task, **extra)
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["params"]["task"]) == ("queued", task)
