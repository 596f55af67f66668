"""The engine thread: no request can stop it; if it stops anyway, or the server shuts down, every request
in flight ends with an error at once (never a hang), later ones are refused, /health turns 503 and the
serving process exits non-zero so that its supervisor starts a new one."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from worker.serving.adapters import LocalDirectorySource
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig
from worker.serving.errors import EngineError
from worker.serving.lifetime import EXIT_ENGINE_DIED, ServingServer
from worker.serving.params import SamplingParams
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant

PROMPT = [1, 504, 3458, 282, 4649, 314, 57, 1107]
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500, "ignore_eos_token": True}}


class _Fatal(BaseException):
    """What no per-request guard catches: it ends the engine thread."""


def _engine(tiny_model_dir: Path, adapter_root: Path) -> AsyncEngine:
    config = EngineConfig(model_path=tiny_model_dir, model_name="tiny", kv_cache_bytes=16 << 20)
    return AsyncEngine(config, LocalDirectorySource(adapter_root))


def test_a_request_that_breaks_admission_fails_alone_and_the_engine_keeps_serving(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    """A seed past 64 bits made `make_generator` raise on the engine thread and killed it (issue 15);
    params that skipped the edge's checks must fail only their own request."""
    engine = _engine(tiny_model_dir, adapter_root)
    engine.start()
    unchecked = SamplingParams(max_tokens=4, temperature=1.0)
    object.__setattr__(unchecked, "seed", 2**64)

    async def scenario() -> list[int]:
        with pytest.raises(EngineError, match="could not be admitted"):
            async for _ in engine.generate(PROMPT, unchecked):
                pass
        return [
            o.token_id async for o in engine.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))
        ]

    try:
        assert len(asyncio.run(asyncio.wait_for(scenario(), 30))) == 4
        assert engine.ready
    finally:
        engine.shutdown()


class _LiveServingServer:
    """`ServingServer` (what `tuneforge serve` runs) on a free port, in a thread: no signals, no hard exit."""

    def __init__(self, engine: AsyncEngine) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            build_app(engine, tenants=TrustedTenant("dev")),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
        self.engine = engine
        self.server = ServingServer(config, engine)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _LiveServingServer:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()


@pytest.fixture
def live(tiny_model_dir: Path, adapter_root: Path) -> Iterator[_LiveServingServer]:
    with _LiveServingServer(_engine(tiny_model_dir, adapter_root)) as server:
        yield server


def _events_after_the_first(response: httpx.Response) -> Iterator[dict[str, object]]:
    lines = (line for line in response.iter_lines() if line.startswith("data:"))
    next(lines)  # the stream is under way
    yield from (json.loads(line[5:]) for line in lines)


def test_when_the_engine_thread_dies_requests_end_health_turns_503_and_the_server_exits(
    live: _LiveServingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with httpx.stream("POST", f"{live.url}/generate_stream", json=LONG, timeout=30) as stream:
        events = _events_after_the_first(stream)

        def die() -> int:
            raise _Fatal

        monkeypatch.setattr(live.engine.engine, "step", die)
        started = time.monotonic()
        last = list(events)[-1]
    assert "error" in last and "engine stopped" in str(last["error"])  # ended, not hung
    assert time.monotonic() - started < 5
    live.thread.join(timeout=15)  # the server stops on its own...
    assert not live.thread.is_alive()
    assert live.server.exit_code == EXIT_ENGINE_DIED  # ...and says so, for its supervisor
    assert not live.engine.ready


def test_health_turns_503_and_new_requests_are_refused_the_moment_the_engine_closes(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    from fastapi.testclient import TestClient

    engine = _engine(tiny_model_dir, adapter_root)
    engine.start()
    with TestClient(build_app(engine, tenants=TrustedTenant("dev"))) as client:
        assert client.get("/health").status_code == 200
        engine.begin_shutdown()
        assert client.get("/health").status_code == 503
        refused = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    engine.shutdown()


def test_stopping_the_server_ends_streams_in_flight_at_once(live: _LiveServingServer) -> None:
    """SIGTERM's path (uvicorn's shutdown): streams end with an error now, not after 1500 tokens."""
    with httpx.stream("POST", f"{live.url}/generate_stream", json=LONG, timeout=30) as stream:
        events = _events_after_the_first(stream)
        started = time.monotonic()
        live.server.stop()
        last = list(events)[-1]
    assert "error" in last and "shutting down" in str(last["error"])
    live.thread.join(timeout=15)
    assert not live.thread.is_alive() and time.monotonic() - started < 10
    assert live.server.exit_code == 0
