"""Hostile tenants against datasets and uploads, one test per case of issue 15, on both stacks.

A live server over real sockets (uvicorn), with a real validate worker beside it (see `live_server`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

ROWS = b"prompt,completion\nWhat is 2+2?,4\nCapital of France?,Paris\n"
# Every other call must keep answering within this while a hostile tenant does its worst.
SNAPPY_S = 1.0


@pytest.fixture
def api(live_server: Any) -> Iterator[httpx.Client]:
    token = live_server.mint_token(f"t-{secrets.token_hex(4)}")
    with httpx.Client(
        base_url=live_server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


def _begin(api: httpx.Client, file_name: str, **extra: Any) -> dict[str, str]:
    begun = api.post("/v2/datasets/upload", json={"fileName": file_name, **extra})
    begun.raise_for_status()
    return dict(begun.json())


def _finish(api: httpx.Client, name: str, token: str) -> httpx.Response:
    return api.put("/v2/datasets/upload", json={"name": name, "uploadToken": token})


def _wait(api: httpx.Client, name: str, timeout: float = 60) -> dict[str, Any]:
    """Poll like the SDK does, asserting on the way that every answer comes back quickly."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        body = dict(api.get(f"/v1/datasets/name/{name}").json())
        assert time.monotonic() - started < SNAPPY_S, "the API slowed down while the dataset was validated"
        if body["status"] != "validating" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_poison_json_dataset_ends_errored_and_the_api_keeps_answering(api: httpx.Client) -> None:
    begun = _begin(api, "poison.json")
    poison = b"[" * 200_000 + b"]" * 200_000
    httpx.put(begun["presignedUrl"], content=poison, timeout=30).raise_for_status()
    assert _finish(api, "poison", begun["uploadToken"]).status_code == 200
    body = _wait(api, "poison")
    assert body["status"] == "errored", body
    assert "nested more than" in body["lastError"], body["lastError"]
    assert api.get("/healthz").status_code == 200


@contextmanager
def _slow_uploads(urls: list[str], declared: int = 10_000_000) -> Iterator[None]:
    """PUTs that trickle one byte per connection every 0.2 s, for as long as the block runs."""
    socks = []
    for url in urls:
        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        head = f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode())
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            for sock in socks:
                with suppress(OSError):  # a connection the server dropped
                    sock.sendall(b"p")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for sock in socks:
            sock.close()


def test_forty_slow_uploads_leave_other_calls_answering_within_a_second(api: httpx.Client) -> None:
    urls = [_begin(api, f"slow-{i}.csv")["presignedUrl"] for i in range(40)]
    with _slow_uploads(urls):
        time.sleep(1.0)  # the uploads are in flight: every connection has sent headers and bytes
        for _ in range(10):
            started = time.monotonic()
            answer = api.get("/v2/datasets")
            assert answer.status_code == 200
            assert time.monotonic() - started < SNAPPY_S, "40 slow uploads starved an ordinary call"
            started = time.monotonic()
            assert api.get("/users/current").status_code == 200
            assert time.monotonic() - started < SNAPPY_S


def test_a_second_registration_with_the_same_upload_token_is_refused(api: httpx.Client) -> None:
    begun = _begin(api, "once.csv")
    httpx.put(begun["presignedUrl"], content=ROWS).raise_for_status()
    assert _finish(api, "first", begun["uploadToken"]).status_code == 200
    second = _finish(api, "second", begun["uploadToken"])
    assert second.status_code == 409, second.text
    assert "uploadToken" in second.json()["error"] and "already registered" in second.json()["error"]
    assert [d["name"] for d in api.get("/v2/datasets").json()["data"]] == ["first"]


@pytest.mark.parametrize("declared", [False, True], ids=["relayed-or-local", "size-declared"])
def test_a_put_after_finish_does_not_change_the_dataset(api: httpx.Client, declared: bool) -> None:
    extra = {"sizeBytes": len(ROWS)} if declared else {}
    begun = _begin(api, "frozen.csv", **extra)
    httpx.put(begun["presignedUrl"], content=ROWS).raise_for_status()
    assert _finish(api, "frozen", begun["uploadToken"]).status_code == 200
    before = _wait(api, "frozen")
    assert before["status"] == "connected", before
    swapped = ROWS.replace(b"Paris", b"Lyon!")  # same length: a size-bound URL would take it
    httpx.put(begun["presignedUrl"], content=swapped)  # accepted or refused: either way, no effect
    after = api.get("/v1/datasets/name/frozen").json()
    assert (after["sha256"], after["rowCount"]) == (hashlib.sha256(ROWS).hexdigest(), before["rowCount"])
    link = api.get(f"/v2/datasets/{after['uuid']}/download-link").json()["url"]
    assert httpx.get(link).content == ROWS


def _upload(api: httpx.Client, name: str, file_name: str, data: bytes) -> dict[str, Any]:
    begun = _begin(api, file_name)
    httpx.put(begun["presignedUrl"], content=data, timeout=60).raise_for_status()
    assert _finish(api, name, begun["uploadToken"]).status_code == 200
    return _wait(api, name)


def test_a_classification_file_of_a_distinct_label_per_row_is_refused_at_the_label_bound(
    api: httpx.Client,
) -> None:
    # 200k rows, each its own class: the validator stops at the bound instead of tallying them all.
    data = b"".join(b'{"text": "t", "label": "class-%d"}\n' % n for n in range(200_000))
    body = _upload(api, "labels", "labels.jsonl", data)
    assert body["status"] == "errored", body
    assert "line 1001: label 'class-1000' is past the 1000 distinct labels" in body["lastError"]
    assert api.get("/healthz").status_code == 200


@pytest.mark.parametrize("file_name", ["deep.jsonl", "deep.csv"])
def test_a_preference_row_whose_input_nests_without_end_ends_errored(
    api: httpx.Client, file_name: str
) -> None:
    # 50k levels: past Python's recursion limit, and under the CSV reader's cell bound (a CSV cell's JSON
    # is parsed by the row check, a JSONL line's by the reader).
    row = {
        "input": '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "preferred_output": '[{"role": "assistant", "content": "a"}]',
        "non_preferred_output": "[]",
    }
    if file_name.endswith(".csv"):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([list(row), list(row.values())])
        data = out.getvalue()
    else:
        data = "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in row.items()) + "}\n"
    body = _upload(api, "deep", file_name, data.encode())
    assert body["status"] == "errored", body
    assert "nested more than 64 levels deep" in body["lastError"], body["lastError"]
    assert api.get("/healthz").status_code == 200
