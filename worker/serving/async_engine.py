"""`AsyncEngine`: the engine on a thread of its own, streaming each request's tokens to asyncio callers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.serving.adapters import AdapterSource, ResolvedAdapter
from worker.serving.embedding import EmbeddingJob, EmbeddingResult
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.errors import EngineError, ServingError, ShuttingDownError
from worker.serving.guided import GrammarCompiler
from worker.serving.metrics import ServingMetrics
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.sequence import next_sequence_id

log = logging.getLogger(__name__)

# A request's outputs: a generation's tokens, or an embedding request's one result.
Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[Any]"]


@dataclass(frozen=True)
class _Add:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    adapter: ResolvedAdapter | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenOutput | BaseException]
    arrival: float


@dataclass(frozen=True)
class _Abort:
    seq_id: int


@dataclass(frozen=True)
class _Embed:
    job: EmbeddingJob


class AsyncEngine:
    """`LLMEngine` on a thread of its own, with an asyncio face for the HTTP server.

    Requests and aborts reach the thread through an inbox; tokens come back through one asyncio
    queue per request. Leaving `generate()` early (client disconnect, cancellation) posts an abort,
    so the sequence leaves the batch and frees its KV blocks at the next step.

    Nothing a request does stops the thread: a failure while admitting or stepping fails the requests
    it concerns (see engine.py and stepping.py). Should the thread end anyway, or the server begin to
    shut down, the engine closes: every request in flight (queued, running, or waiting on its queue
    here, even behind a wedged step) gets an error at once, later ones are refused, `ready` turns
    False (`/health` answers 503), and `on_death` tells the process to exit so that its supervisor
    starts a new one.
    """

    def __init__(
        self,
        config: EngineConfig,
        source: AdapterSource,
        metrics: ServingMetrics | None = None,
        *,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.metrics = metrics or ServingMetrics()
        self.model_name = config.model_name
        self.on_death = on_death
        self._engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Embed] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Posting and closing under one lock: no request can slip into the inbox once it is closed.
        self._lock = threading.Lock()
        self._closed: ServingError | None = None
        self._streams: dict[int, Stream] = {}  # every request between its post and its last output

    def start(self) -> None:
        """Load the model (blocking) and start the engine thread."""
        self._engine = LLMEngine(self.config, self.source, self.metrics)
        # A request waiting for its adapter joins the batch as soon as the load ends: it wakes the loop.
        self._engine.adapters.on_settled(self._wake.set)
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
    def grammars(self) -> GrammarCompiler:
        return self.engine.grammars

    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return self._engine is not None and alive and self._closed is None

    def begin_shutdown(self) -> None:
        """End every request in flight with ShuttingDownError now and refuse new ones; the engine thread
        stops at its next turn. Safe from any thread (the HTTP server calls it when it starts stopping)."""
        self._close(ShuttingDownError("the server is shutting down; retry shortly"))
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._engine is not None:
            self._engine.adapters.shutdown()
            if self._thread is None or not self._thread.is_alive():
                # The KV cache (a GiB by default) goes now, not whenever the last reference to a stopped
                # engine does: a process that starts engines one after another must not hold them all.
                self._engine.runner.release_cache()

    def preload(self, adapter_ids: list[str], tenant: str | None = None) -> None:
        for adapter_id in adapter_ids:
            self.engine.adapters.preload(adapter_id, tenant)

    def resolve_adapter(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        """What the id names for the tenant now. Blocking (a database read): call it from a worker thread."""
        return self.engine.adapters.resolve(adapter_id, tenant)

    def loaded_adapters(self, tenant: str | None = None) -> list[str]:
        """Adapter ids in memory for this tenant (another tenant's same-named adapter is not listed)."""
        return self.engine.adapters.loaded_ids(tenant)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | None = None,
    ) -> AsyncGenerator[TokenOutput, None]:
        """Tokens of one request as they are generated, of its `params.n` choices interleaved (each
        `TokenOutput.choice` says whose), until every choice finished; raises its ServingError if it
        fails. Leaving early aborts every choice."""
        self.engine.validate(prompt_token_ids, params)  # fail fast, before anything is queued
        out: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        seq_id = next_sequence_id()
        loop = asyncio.get_running_loop()
        self._post_add(_Add(seq_id, list(prompt_token_ids), params, adapter, loop, out, time.monotonic()))
        unfinished = params.n
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                unfinished -= item.finished
                finished = unfinished == 0
                yield item
        finally:
            with self._lock:
                self._streams.pop(seq_id, None)
            if not finished:
                self._post(_Abort(seq_id))

    async def embed(
        self, inputs: list[list[int]], adapter: ResolvedAdapter | None = None, *, field: str = "input"
    ) -> EmbeddingResult:
        """Pooled embeddings of the inputs (embedding.py), computed on the engine thread between steps;
        raises the request's ServingError (naming `field` for a bad input) if it fails."""
        return await self._pass(inputs, adapter, field, classify=False)

    async def classify(
        self, inputs: list[list[int]], adapter: ResolvedAdapter, *, field: str = "inputs"
    ) -> EmbeddingResult:
        """Label probabilities of the inputs from a classification adapter (`labels` names the columns);
        the same passes as embeddings, so requests for several adapters share them."""
        return await self._pass(inputs, adapter, field, classify=True)

    async def _pass(
        self, inputs: list[list[int]], adapter: ResolvedAdapter | None, field: str, *, classify: bool
    ) -> EmbeddingResult:
        self.engine.embedder.check(inputs, field)  # fail fast, before anything is queued
        out: asyncio.Queue[EmbeddingResult | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stream_id = next_sequence_id()
        job = EmbeddingJob(
            [list(tokens) for tokens in inputs],
            adapter,
            lambda item: _deliver(loop, out, item),
            classify=classify,
        )
        with self._lock:
            if self._closed is not None:
                raise _fresh(self._closed)
            self._streams[stream_id] = (loop, out)
            self._inbox.put(_Embed(job))
        self._wake.set()
        try:
            item = await out.get()
        finally:
            job.cancelled = True  # a caller that left: the engine drops the job at its next turn
            with self._lock:
                self._streams.pop(stream_id, None)
        if isinstance(item, BaseException):
            raise item
        return item

    def _post_add(self, message: _Add) -> None:
        with self._lock:
            if self._closed is not None:
                raise _fresh(self._closed)
            self._streams[message.seq_id] = (message.loop, message.out)
            self._inbox.put(message)
        self._wake.set()

    def _post(self, message: _Abort) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _close(self, error: ServingError) -> None:
        """Refuse new requests with `error` (the first reason given stays) and send it to every stream."""
        with self._lock:
            if self._closed is None:
                self._closed = error
            error = self._closed
            streams, self._streams = list(self._streams.values()), {}
        for loop, out in streams:
            _deliver(loop, out, _fresh(error))

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        torch.set_grad_enabled(False)
        died = False
        try:
            while not self._stop.is_set():
                try:
                    self._turn(engine)
                except Exception:  # past every per-request guard: fail what is in flight, keep serving
                    log.exception("the engine loop failed outside any one request; failing its requests")
                    engine.fail_all(EngineError("the engine failed while generating; retry the request"))
        except BaseException:
            died = True
            log.critical(
                "the engine thread died; failing every request and stopping the server", exc_info=True
            )
            self._close(ShuttingDownError("the serving engine stopped; the server restarts, retry shortly"))
        finally:
            self._close(ShuttingDownError("the server is shutting down; retry shortly"))
            self._fail_everything(engine)
        if died and self.on_death is not None:
            self.on_death()

    def _turn(self, engine: LLMEngine) -> None:
        self._drain_inbox(engine)
        if not engine.has_work:
            # Idle, or only waiting for adapter loads: sleep until a request or an abort arrives or a load
            # ends (each sets _wake). The bound only caps how long a missed wake-up could cost.
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        engine.step()

    def _fail_everything(self, engine: LLMEngine) -> None:
        """After the loop: whatever is still queued or in the engine ends with the closing error."""
        assert self._closed is not None
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, _Add):
                _deliver(message.loop, message.out, _fresh(self._closed))
        try:
            engine.fail_all(self._closed)
        except Exception:  # its streams have their error already (_close)
            log.exception("failing the engine's requests at shutdown")

    def _drain_inbox(self, engine: LLMEngine) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Abort):
                engine.abort(message.seq_id)
                continue
            if isinstance(message, _Embed):
                engine.embedder.admit(message.job)
                continue
            try:
                request = engine.add_request(
                    message.prompt,
                    message.params,
                    message.adapter,
                    seq_id=message.seq_id,
                    arrival=message.arrival,
                )
            except ServingError as exc:
                _deliver(message.loop, message.out, exc)
                continue
            except Exception:  # admitting must not stop the loop: this request fails, alone
                log.exception("admitting request %s failed", message.seq_id)
                _deliver(message.loop, message.out, EngineError("the request could not be admitted; retry"))
                continue
            request.async_deliver = (message.loop, message.out)


def _fresh(error: ServingError) -> ServingError:
    """A new instance per request: one exception object raised in many tasks would share a traceback."""
    return type(error)(error.message, field=error.field)


def _deliver(loop: asyncio.AbstractEventLoop, out: asyncio.Queue[Any], item: object) -> None:
    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for this request any more
        loop.call_soon_threadsafe(out.put_nowait, item)
