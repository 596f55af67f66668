"""Where adapters come from (`AdapterSource`), what an adapter id names right now (`ResolvedAdapter`),
and the in-memory LRU cache of loaded ones.

An id (`repo/N`) is resolved per request, in the HTTP handler's worker thread (never on the event loop
or the engine thread), with a memory of at most `resolve_ttl_s`: a version deleted or archived stops
being served within that time, and weights are cached under what the id resolved to (a stored
version's uuid), so a repo deleted and made again never serves the old `repo/1`.

Loads run on a background thread: a request for an adapter not yet in memory waits in the queue
while the running batch keeps decoding, and joins the batch the step after its adapter is ready. Each
load is a future: its end (loaded or failed) wakes whoever subscribed (`on_settled`: the engine
thread) and whoever waits on it (`wait`, `wait_for_load`), so nobody polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ArtifactManifest

from worker.serving.adapter_loader import LoadShape, load_adapter
from worker.serving.errors import AdapterLoadError, AdapterNotFoundError, AdapterSourceError, ServingError
from worker.serving.lora import AdapterWeights
from worker.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

# A broken adapter fails every request for it this long without another load attempt.
FAILED_LOAD_MEMORY_S = 10.0
# How long what an id resolved to is reused: a deleted version is served at most this long after.
DEFAULT_RESOLVE_TTL_S = 2.0
# Resolutions remembered at once (tenant x id); older ones are dropped first.
MAX_REMEMBERED_RESOLUTIONS = 4096


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter id, as a tenant named it, resolved to the weights it names now.

    `key` identifies those weights (for stored adapters the version's uuid): the cache holds them under
    it. `location` is whatever the source needs to fetch them; the engine never looks inside.
    """

    adapter_id: str
    tenant: str | None
    key: str
    location: Any = None


class AdapterSource(Protocol):
    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        """What `adapter_id` names for `tenant` now (blocking I/O is fine: called off the event loop).

        Raises AdapterNotFoundError (unknown, deleted, archived, or another tenant's) or
        AdapterLoadError (it exists but this deployment cannot serve it).
        """

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        """A local directory with adapter_config.json + adapter_model.safetensors (blocking I/O is fine)."""

    def list_available(self, tenant: str | None) -> list[str]: ...


def check_adapter_id(adapter_id: str) -> None:
    try:
        AdapterRef.parse(adapter_id)
    except AdapterRefError:
        raise AdapterNotFoundError(
            f"adapter id {adapter_id[:80]!r} is not of the form repo/N or repo/N@step (e.g. 'my-repo/1')",
            field="adapter_id",
        ) from None


class LocalDirectorySource:
    """Adapters laid out as `<root>/<repo>/<N>` (or `<root>/<repo>/<N>@<step>`): tests, benches, files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        check_adapter_id(adapter_id)
        path = self.root / adapter_id
        files = ArtifactManifest.of_directory(path)
        if not files.has_lora_config and not files.has_speculator:
            raise AdapterNotFoundError(f"adapter {adapter_id} not found", field="adapter_id")
        # A directory has no identity of its own: each tenant's name for it is cached apart.
        return ResolvedAdapter(adapter_id, tenant, f"{tenant or ''}::{adapter_id}", path)

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        return Path(adapter.location)

    def list_available(self, tenant: str | None) -> list[str]:
        found = (p.parent.relative_to(self.root) for p in self.root.glob(f"*/*/{ADAPTER_CONFIG}"))
        return sorted(str(p) for p in found)


class Resolutions:
    """Adapter ids resolved through a source, each remembered for `ttl_s` (failures too): a deleted
    version stops being served within that time, and a busy adapter costs one lookup per `ttl_s`."""

    def __init__(self, source: AdapterSource, ttl_s: float = DEFAULT_RESOLVE_TTL_S) -> None:
        self.source = source
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        # (tenant, id) -> (when it expires, what it resolved to or why it did not)
        self._resolved: dict[tuple[str, str], tuple[float, ResolvedAdapter | ServingError]] = {}

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        """What `adapter_id` names for `tenant` now. Blocking: call it from a worker thread, never from
        the event loop or the engine thread."""
        check_adapter_id(adapter_id)
        name = (tenant or "", adapter_id)
        now = time.monotonic()
        with self._lock:
            remembered = self._resolved.get(name)
        if remembered is None or remembered[0] <= now:
            remembered = (now + self.ttl_s, self._resolve_now(adapter_id, tenant))
            with self._lock:
                self._remember(name, remembered, now)
        result = remembered[1]
        if isinstance(result, ServingError):  # a copy per request: one instance raised in many threads
            raise type(result)(result.message, field=result.field)
        return result

    def _resolve_now(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter | ServingError:
        try:
            return self.source.resolve(adapter_id, tenant)
        except ServingError as exc:
            return exc
        except Exception:  # the database or blob store is out of reach: not remembered, retried next time
            log.exception("resolving adapter %s for tenant %s failed", adapter_id, tenant)
            raise AdapterSourceError(
                f"adapter {adapter_id} cannot be looked up right now; retry shortly", field="adapter_id"
            ) from None

    def _remember(
        self, name: tuple[str, str], entry: tuple[float, ResolvedAdapter | ServingError], now: float
    ) -> None:
        self._resolved[name] = entry
        if len(self._resolved) > MAX_REMEMBERED_RESOLUTIONS:
            for old in [n for n, (expires, _) in self._resolved.items() if expires <= now]:
                del self._resolved[old]
            while len(self._resolved) > MAX_REMEMBERED_RESOLUTIONS:
                del self._resolved[next(iter(self._resolved))]


class AdapterCache:
    """Loaded adapters keyed by what their ids resolved to, at most `max_adapters` beyond those in use.

    An adapter used by a running sequence is pinned; eviction takes the least recently used unpinned
    one. Failed loads are remembered briefly so a broken adapter fails fast, not once per request.
    """

    def __init__(
        self,
        source: AdapterSource,
        *,
        max_adapters: int,
        shape: LoadShape,
        metrics: ServingMetrics,
        resolve_ttl_s: float = DEFAULT_RESOLVE_TTL_S,
    ) -> None:
        self.source = source
        self.max_adapters = max_adapters
        self.shape = shape
        self.metrics = metrics
        self.resolve_ttl_s = resolve_ttl_s
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._loading: dict[str, Future[None]] = {}
        self._pins: dict[str, int] = {}
        self._failed: dict[str, tuple[float, ServingError]] = {}
        self._resolutions = Resolutions(source, resolve_ttl_s)
        self._names: dict[str, tuple[str, str]] = {}  # key -> the (tenant, id) it was last asked by
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-loader")
        self._listeners: list[Callable[[], None]] = []

    # --- resolving (HTTP worker threads) ----------------------------------------------------------

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        """What `adapter_id` names for `tenant` now, remembered for `resolve_ttl_s` (see `Resolutions`)."""
        return self._resolutions.resolve(adapter_id, tenant)

    # --- loading (the engine thread asks, loader threads load) -----------------------------------

    def request(self, adapter: ResolvedAdapter) -> str:
        """Start loading if needed (counts a hit or a miss) and return the cache key."""
        key = adapter.key
        with self._lock:
            self._names[key] = (adapter.tenant or "", adapter.adapter_id)
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] > FAILED_LOAD_MEMORY_S:
                del self._failed[key]  # it may have been fixed: try again
            if key in self._loaded:
                self.metrics.adapter_hits.inc()
                self._loaded.move_to_end(key)
            else:
                self.metrics.adapter_misses.inc()
                if key not in self._loading and key not in self._failed:
                    self._start_load(adapter)
        return key

    def preload(self, adapter_id: str, tenant: str | None) -> None:
        self.request(self.resolve(adapter_id, tenant))

    def state(self, adapter: ResolvedAdapter) -> AdapterWeights | ServingError | None:
        """The loaded adapter, the error that failed its load, or None while it is (re)loading."""
        key = adapter.key
        with self._lock:
            weights = self._loaded.get(key)
            if weights is not None:
                return weights
            if key in self._failed:
                return self._failed[key][1]
            if key not in self._loading:  # evicted before its request took it: load it again
                self._start_load(adapter)
        return None

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Have `callback` called (on a loader thread) each time a load ends, loaded or failed."""
        self._listeners.append(callback)

    def wait(self, adapter: ResolvedAdapter, timeout: float) -> bool:
        """Blocks until the adapter is loaded or its load failed (True), or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while self.state(adapter) is None:  # state() (re)starts its load if it was evicted meanwhile
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._lock:
                future = self._loading.get(adapter.key)
            if future is not None:
                futures.wait([future], timeout=left)
        return True

    def wait_for_load(self, timeout: float) -> None:
        """Blocks until one of the loads in flight ends, at most `timeout` seconds (none in flight: at
        once). For a caller with nothing to do before a load ends."""
        with self._lock:
            loading = list(self._loading.values())
        if loading:
            futures.wait(loading, timeout=timeout, return_when=futures.FIRST_COMPLETED)

    def _start_load(self, adapter: ResolvedAdapter) -> None:
        """Submits the load (caller holds the lock); its end is announced to the subscribers."""
        future = self._pool.submit(self._load, adapter)
        self._loading[adapter.key] = future
        future.add_done_callback(self._settled)

    def _settled(self, _: Future[None]) -> None:
        for callback in list(self._listeners):
            callback()

    def mark_failed(self, key: str, error: ServingError) -> None:
        """An adapter that broke a step: dropped, and refused like a failed load for a while."""
        with self._lock:
            self._loaded.pop(key, None)
            self._failed[key] = (time.monotonic(), error)
            self.metrics.adapters_loaded.set(len(self._loaded))

    def install(self, adapter: ResolvedAdapter, weights: AdapterWeights) -> None:
        """Weights built in memory (not fetched from the source) held under `adapter.key`, as if loaded."""
        with self._lock:
            self._names[adapter.key] = (adapter.tenant or "", adapter.adapter_id)
            self._failed.pop(adapter.key, None)
            self._loaded[adapter.key] = weights
            self._evict(keep=adapter.key)
            self.metrics.adapters_loaded.set(len(self._loaded))

    def drop(self, key: str) -> None:
        """Forget an adapter's weights now (its pinned requests keep theirs until they finish)."""
        with self._lock:
            self._loaded.pop(key, None)
            self._evict()

    def pin(self, key: str) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            if key in self._loaded:
                self._loaded.move_to_end(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)
            self._evict()

    def loaded_ids(self, tenant: str | None = None) -> list[str]:
        """Ids this tenant asked for whose weights are in memory, least recently used first."""
        with self._lock:
            names = [self._names.get(key) for key in self._loaded]
        return [name[1] for name in names if name is not None and name[0] == (tenant or "")]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, adapter: ResolvedAdapter) -> None:
        try:
            weights = self._read(adapter)
        except ServingError as exc:
            self._record_failure(adapter.key, exc)
            return
        with self._lock:
            self._loaded[adapter.key] = weights
            self._loading.pop(adapter.key, None)
            self._evict(keep=adapter.key)  # a fresh load waits for its request; evicting it would reload it
        self.metrics.adapter_loads.labels(outcome="loaded").inc()

    def _read(self, adapter: ResolvedAdapter) -> AdapterWeights:
        """Fetches and checks the weights; a refusal names the adapter and the rule, never a path."""
        shape = self.shape
        try:
            directory = self.source.fetch(adapter)
            return load_adapter(adapter.key, directory, shape)
        except AdapterLoadError as exc:
            log.warning("adapter %s (tenant %s) refused: %s", adapter.adapter_id, adapter.tenant, exc.message)
            prefix = f"adapter {adapter.adapter_id}"
            message = (
                exc.message if exc.message.startswith(prefix) else f"{prefix} cannot be served: {exc.message}"
            )
            raise AdapterLoadError(message, field="adapter_id") from None
        except ServingError:
            raise
        except Exception as exc:
            log.exception("loading adapter %s (tenant %s) failed", adapter.adapter_id, adapter.tenant)
            raise AdapterLoadError(
                f"adapter {adapter.adapter_id} failed to load ({type(exc).__name__}); see the server log",
                field="adapter_id",
            ) from None

    def _record_failure(self, key: str, error: ServingError) -> None:
        self.metrics.adapter_loads.labels(outcome="failed").inc()
        now = time.monotonic()
        with self._lock:
            # Each upload is a new key: forget old failures, or a tenant uploading broken adapters
            # would grow this without bound.
            for old in [k for k, (when, _) in self._failed.items() if now - when > FAILED_LOAD_MEMORY_S]:
                del self._failed[old]
            self._failed[key] = (now, error)
            self._loading.pop(key, None)

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned adapters over the bound (caller holds the lock)."""
        for key in list(self._loaded):
            if len(self._loaded) <= self.max_adapters:
                break
            if self._pins.get(key) or key == keep:
                continue
            del self._loaded[key]
            self.metrics.adapter_evictions.inc()
        for key in [k for k in self._names if k not in self._loaded and k not in self._loading]:
            if not self._pins.get(key):
                del self._names[key]
        self.metrics.adapters_loaded.set(len(self._loaded))
