"""A live serving process for the HTTP tests: the real engine behind uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from worker.serving.adapters import LocalDirectorySource
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig
from worker.serving.metrics import ServingMetrics
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant

TINY = "tiny-random-llama"


class LiveServingServer:
    """`build_app` over a started `AsyncEngine`, served by uvicorn in a background thread."""

    def __init__(
        self,
        model_dir: Path,
        adapter_root: Path,
        *,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
    ) -> None:
        config = EngineConfig(
            model_path=model_dir,
            model_name=TINY,
            dtype="fp32",
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes,
        )
        self.engine = AsyncEngine(config, source=LocalDirectorySource(adapter_root), metrics=ServingMetrics())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveServingServer:
        self.engine.start()
        # These tests exercise the routes, not the assertion (tests/hostile/test_identity.py does).
        app = build_app(self.engine, tenants=TrustedTenant("dev"))
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("serving test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
        self.engine.shutdown()
