"""`GET /v2/datasets/{ref}/lengths`: the row-length histogram the dashboard draws."""

from __future__ import annotations

import json

from tests_support import assert_error

CHAT = [
    {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]},
    {
        "messages": [
            {"role": "user", "content": " ".join(["word"] * 40)},
            {"role": "assistant", "content": "ok"},
        ]
    },
]


def test_lengths_count_every_row_of_a_connected_dataset(tenant) -> None:
    tenant.upload_dataset("chat", "chat.json", json.dumps(CHAT).encode())
    body = tenant.client.get("/v2/datasets/chat/lengths").json()
    assert body["rows"] == 2
    assert (body["min"], body["max"]) == (4, 41)  # "hi there" + "hello" "!"; 40 words + "ok"
    assert sum(b["count"] for b in body["bins"]) == 2
    assert body["bins"][0]["start"] == 0 and body["bins"][-1]["end"] > 41
    assert body["tokenizer"].startswith("approximate")


def test_lengths_of_an_errored_dataset_is_409(tenant) -> None:
    assert tenant.upload_dataset("bad", "bad.jsonl", b'{"nothing": 1}\n')["status"] == "errored"
    assert_error(tenant.client.get("/v2/datasets/bad/lengths"), 409, "connected")


def test_lengths_of_another_tenants_dataset_is_404(tenant, other_tenant) -> None:
    tenant.upload_dataset("mine", "qa.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    assert_error(other_tenant.client.get("/v2/datasets/mine/lengths"), 404, "not found")
