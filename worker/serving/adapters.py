"""Where adapters come from (`AdapterSource`) and the in-memory LRU cache of loaded ones.

Loads run on a background thread: a request for an adapter not yet in memory waits in the queue
while the running batch keeps decoding, and joins the batch the step after its adapter is ready.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from worker.serving.cpu_kernels import SmallGemm
from worker.serving.eagle import ModelShape
from worker.serving.errors import AdapterLoadError, AdapterNotFoundError, ServingError
from worker.serving.lora import AdapterWeights
from worker.serving.metrics import ServingMetrics
from worker.serving.speculator import has_speculator

log = logging.getLogger(__name__)

# A broken adapter fails every request for it this long without another load attempt.
FAILED_LOAD_MEMORY_S = 10.0
ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}/[0-9]+(@[0-9]+)?$")


class AdapterSource(Protocol):
    def fetch(self, adapter_id: str, tenant: str | None) -> Path:
        """A local directory with adapter_config.json + adapter_model.safetensors (blocking I/O is fine).

        Raises AdapterNotFoundError (unknown, or another tenant's) or AdapterLoadError.
        """

    def list_available(self, tenant: str | None) -> list[str]: ...


def check_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID.match(adapter_id):
        raise AdapterNotFoundError(
            f"adapter id {adapter_id!r} is not of the form repo/N or repo/N@step (e.g. 'my-repo/1')",
            field="adapter_id",
        )


class LocalDirectorySource:
    """Adapters laid out as `<root>/<repo>/<N>` (or `<root>/<repo>/<N>@<step>`): tests, benches, files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fetch(self, adapter_id: str, tenant: str | None) -> Path:
        check_adapter_id(adapter_id)
        path = self.root / adapter_id
        if not (path / "adapter_config.json").is_file() and not has_speculator(path):
            raise AdapterNotFoundError(f"adapter {adapter_id} not found")
        return path

    def list_available(self, tenant: str | None) -> list[str]:
        found = (p.parent.relative_to(self.root) for p in self.root.glob("*/*/adapter_config.json"))
        return sorted(str(p) for p in found)


class AdapterCache:
    """Loaded adapters keyed by `tenant::id`, at most `max_adapters` of them beyond those in use.

    An adapter used by a running sequence is pinned; eviction takes the least recently used unpinned
    one. Failed loads are remembered briefly so a broken adapter fails fast, not once per request.
    """

    def __init__(
        self,
        source: AdapterSource,
        *,
        max_adapters: int,
        num_layers: int,
        dtype: torch.dtype,
        metrics: ServingMetrics,
        device: torch.device | None = None,
        hidden_size: int | None = None,
        model_shape: ModelShape | None = None,
        kernel: SmallGemm | None = None,  # the runner's small-step kernel, for eagle draft layers
    ) -> None:
        self.source = source
        self.max_adapters = max_adapters
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.hidden_size = hidden_size
        self.model_shape = model_shape
        self.kernel = kernel
        self.metrics = metrics
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._loading: dict[str, Future[None]] = {}
        self._pins: dict[str, int] = {}
        self._failed: dict[str, tuple[float, ServingError]] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-loader")

    @staticmethod
    def key(adapter_id: str, tenant: str | None) -> str:
        return f"{tenant or ''}::{adapter_id}"

    def request(self, adapter_id: str, tenant: str | None) -> str:
        """Start loading if needed (counts a hit or a miss) and return the cache key."""
        check_adapter_id(adapter_id)
        key = self.key(adapter_id, tenant)
        with self._lock:
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] > FAILED_LOAD_MEMORY_S:
                del self._failed[key]  # it may have been fixed (uploaded again): try again
            if key in self._loaded:
                self.metrics.adapter_hits.inc()
                self._loaded.move_to_end(key)
            else:
                self.metrics.adapter_misses.inc()
                if key not in self._loading and key not in self._failed:
                    self._loading[key] = self._pool.submit(self._load, key, adapter_id, tenant)
        return key

    def preload(self, adapter_id: str, tenant: str | None) -> None:
        self.request(adapter_id, tenant)

    def state(self, key: str) -> AdapterWeights | ServingError | None:
        """The loaded adapter, the error that failed its load, or None while it is (re)loading."""
        with self._lock:
            weights = self._loaded.get(key)
            if weights is not None:
                return weights
            if key in self._failed:
                return self._failed[key][1]
            if key not in self._loading:  # evicted before its request took it: load it again
                tenant, adapter_id = key.split("::", 1)
                self._loading[key] = self._pool.submit(self._load, key, adapter_id, tenant or None)
        return None

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
        prefix = self.key("", tenant)
        with self._lock:
            return [key[len(prefix) :] for key in self._loaded if key.startswith(prefix)]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str, adapter_id: str, tenant: str | None) -> None:
        try:
            directory = self.source.fetch(adapter_id, tenant)
            weights = AdapterWeights.load(
                key,
                directory,
                num_layers=self.num_layers,
                dtype=self.dtype,
                device=self.device,
                hidden_size=self.hidden_size,
                model_shape=self.model_shape,
                kernel=self.kernel,
            )
        except Exception as exc:
            if not isinstance(exc, ServingError):
                log.exception("loading adapter %s failed", adapter_id)
                exc = AdapterLoadError(f"adapter {adapter_id} failed to load: {exc}")
            self.metrics.adapter_loads.labels(outcome="failed").inc()
            with self._lock:
                self._failed[key] = (time.monotonic(), exc)
                self._loading.pop(key, None)
            return
        with self._lock:
            self._loaded[key] = weights
            self._loading.pop(key, None)
            self._evict(keep=key)  # a fresh load waits for its request; evicting it would only reload it
        self.metrics.adapter_loads.labels(outcome="loaded").inc()

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned adapters over the bound (caller holds the lock)."""
        for key in list(self._loaded):
            if len(self._loaded) <= self.max_adapters:
                break
            if self._pins.get(key) or key == keep:
                continue
            del self._loaded[key]
            self.metrics.adapter_evictions.inc()
        self.metrics.adapters_loaded.set(len(self._loaded))
