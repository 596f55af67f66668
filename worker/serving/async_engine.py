"""`AsyncEngine`: the engine on a thread of its own, streaming each request's tokens to asyncio callers."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import torch

from worker.serving.adapters import AdapterSource
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.errors import EngineError, ServingError, ShuttingDownError
from worker.serving.metrics import ServingMetrics
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.sequence import next_sequence_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    adapter_id: str | None
    tenant: str | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenOutput | BaseException]
    arrival: float


@dataclass(frozen=True)
class _Abort:
    seq_id: int


class AsyncEngine:
    """`LLMEngine` on a thread of its own, with an asyncio face for the HTTP server.

    Requests and aborts reach the thread through an inbox; tokens come back through one asyncio
    queue per request. Leaving `generate()` early (client disconnect, cancellation) posts an abort,
    so the sequence leaves the batch and frees its KV blocks at the next step.
    """

    def __init__(
        self, config: EngineConfig, source: AdapterSource, metrics: ServingMetrics | None = None
    ) -> None:
        self.config = config
        self.source = source
        self.metrics = metrics or ServingMetrics()
        self.model_name = config.model_name
        self._engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load the model (blocking) and start the engine thread."""
        self._engine = LLMEngine(self.config, self.source, self.metrics)
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("AsyncEngine.start() has not been called")
        return self._engine

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._engine is not None:
            self._engine.adapters.shutdown()

    def preload(self, adapter_ids: list[str], tenant: str | None = None) -> None:
        for adapter_id in adapter_ids:
            self.engine.adapters.preload(adapter_id, tenant)

    def loaded_adapters(self, tenant: str | None = None) -> list[str]:
        """Adapter ids in memory for this tenant (another tenant's same-named adapter is not listed)."""
        return self.engine.adapters.loaded_ids(tenant)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        tenant: str | None = None,
    ) -> AsyncGenerator[TokenOutput, None]:
        """Tokens of one request as they are generated; raises its ServingError if it fails."""
        self.engine.validate(prompt_token_ids, params)  # fail fast, before anything is queued
        out: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        seq_id = next_sequence_id()
        loop = asyncio.get_running_loop()
        self._post(
            _Add(seq_id, list(prompt_token_ids), params, adapter_id, tenant, loop, out, time.monotonic())
        )
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._post(_Abort(seq_id))

    def _post(self, message: _Add | _Abort) -> None:
        self._inbox.put(message)
        self._wake.set()

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(engine)
            if not engine.has_work:
                # Idle, or only waiting for adapter loads: sleep until a request arrives (polling loads).
                self._wake.wait(timeout=0.005 if engine.has_unfinished else 1.0)
                self._wake.clear()
                continue
            try:
                engine.step()
            except Exception as exc:  # a bug in a step must not kill the server: fail its requests
                log.exception("engine step failed; failing the requests in it")
                engine.fail_all(EngineError(f"internal engine error: {exc}"))
        engine.fail_all(ShuttingDownError("the server is shutting down"))

    def _drain_inbox(self, engine: LLMEngine) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Abort):
                engine.abort(message.seq_id)
                continue
            try:
                request = engine.add_request(
                    message.prompt,
                    message.params,
                    message.adapter_id,
                    message.tenant,
                    seq_id=message.seq_id,
                    arrival=message.arrival,
                )
            except ServingError as exc:
                message.loop.call_soon_threadsafe(message.out.put_nowait, exc)
                continue
            request.async_deliver = (message.loop, message.out)
