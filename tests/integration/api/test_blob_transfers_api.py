"""Bytes through the control plane's own blob URLs: limited in number, dropped when stalled, async.

Against a live server (uvicorn over real sockets), because stalls and concurrency are what matter.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from live_server import LiveServer

LIMIT = 2
IDLE_S = 1.0


@pytest.fixture(scope="module")
def server(stack_settings_factory: Callable[..., Any]) -> Iterator[LiveServer]:
    settings = stack_settings_factory("embedded", blob_transfer_limit=LIMIT, blob_idle_timeout_seconds=IDLE_S)
    with LiveServer(settings) as live:
        yield live


def _upload_url(server: LiveServer) -> str:
    token = server.mint_token(f"t-{secrets.token_hex(4)}")
    begun = httpx.post(
        f"{server.url}/v2/datasets/upload",
        json={"fileName": "d.csv"},
        headers={"Authorization": f"Bearer {token}"},
    )
    begun.raise_for_status()
    return str(begun.json()["presignedUrl"])


def _start_slow_put(url: str, declared: int = 1000) -> socket.socket:
    """Headers and a first byte of a PUT, then nothing: a client on a very slow link."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + b"p")
    return sock


def _response_of(sock: socket.socket) -> bytes:
    """One HTTP response (status line, headers, Content-Length body); the connection may stay open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"EOF"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_transfers_past_the_limit_are_503_with_retry_after(server: LiveServer) -> None:
    slow = [_start_slow_put(_upload_url(server)) for _ in range(LIMIT)]
    try:
        time.sleep(0.3)  # let the server take both into their slots (no event to await from outside)
        refused = httpx.put(_upload_url(server), content=b"prompt,completion\nq,a\n")
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"].isdigit()
        assert "TUNEFORGE_BLOB_TRANSFER_LIMIT" in refused.json()["error"]
    finally:
        for sock in slow:
            sock.close()


def test_a_stalled_upload_is_dropped_and_its_slot_freed(server: LiveServer) -> None:
    url = _upload_url(server)
    sock = _start_slow_put(url)
    started = time.monotonic()
    with sock:
        answer = _response_of(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"stalled" in answer, answer[:300]
    assert IDLE_S <= time.monotonic() - started < IDLE_S + 5
    # Nothing stored, and a full upload to the same URL now goes through.
    assert httpx.put(url, content=b"prompt,completion\nq,a\n").status_code == 200
