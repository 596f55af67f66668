"""The serving process's /metrics for the vLLM engine: vLLM's own samples, plus the `tuneforge_serving_*`
series the control plane reads (app/services/deployment_metrics.py) computed from them at each scrape.

Finished requests are counted here, by tuneforge's finish reasons, not taken from vLLM: vLLM leaves out
requests whose client closed the stream, which is how every request cut by a stop string ends (tuneforge
matches stop strings on its own text) and how a client that leaves ends its request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0
# tokens_per_second spans the last 10 s of scrapes, as tuneforge's engine counts its last 10 s of steps.
RATE_WINDOW_S = 10.0
_PREFIX = "tuneforge_serving_"


class VllmMetrics:
    """A registry whose one collector scrapes vLLM on every collection (`registry`, as ServingMetrics has)."""

    def __init__(self, vllm_url: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_VllmCollector(f"{vllm_url}/metrics"))
        self.requests = Counter(
            "tuneforge_serving_requests",
            "Finished requests by outcome",
            ["finish_reason"],
            registry=self.registry,
        )


class _VllmCollector(Collector):
    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._totals: deque[tuple[float, float]] = deque()  # (when, generated tokens) of recent scrapes

    def collect(self) -> Iterator[Metric]:
        try:
            text = httpx.get(self._url, timeout=SCRAPE_TIMEOUT_S).raise_for_status().text
        except httpx.HTTPError as exc:
            log.warning("scraping vLLM's metrics failed: %r", exc)
            return
        families = list(text_string_to_metric_families(text))
        yield from self.translate(families)
        yield from families

    def translate(self, families: Iterable[Metric]) -> Iterator[Metric]:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

        def total(name: str) -> float:
            return sum(v for (n, _), v in samples.items() if n == name)

        yield _gauge(
            "running_sequences", "Sequences in the running batch", total("vllm:num_requests_running")
        )
        yield _gauge("waiting_sequences", "Sequences waiting for a slot", total("vllm:num_requests_waiting"))
        yield _counter(
            "generated_tokens", "Tokens generated, all requests", total("vllm:generation_tokens_total")
        )
        yield _counter("prompt_tokens", "Prompt tokens prefilled", total("vllm:prompt_tokens_total"))
        yield _gauge(
            "kv_cache_usage",
            "KV-cache use, 0..1 (vLLM's kv_cache_usage_perc)",
            total("vllm:kv_cache_usage_perc"),
        )
        yield _gauge("adapters_loaded", "Adapters in running or waiting requests", _adapters_in_use(samples))
        info = GaugeMetricFamily(
            _PREFIX + "engine_info", "The serving engine; speculation off: no tuneforge speculators run",
            labels=["engine", "speculation"],
        )  # fmt: skip
        info.add_metric(["vllm", "off"], 1.0)
        yield info
        yield _gauge(
            "tokens_per_second",
            "Generated tokens per second over the last 10 s",
            self._rate(total("vllm:generation_tokens_total")),
        )

    def _rate(self, generated: float) -> float:
        """Tokens a second between this scrape and the oldest one of the last 10 s (or the one before)."""
        now = time.monotonic()
        with self._lock:
            self._totals.append((now, generated))
            while len(self._totals) > 2 and now - self._totals[1][0] >= RATE_WINDOW_S:
                self._totals.popleft()
            when, before = self._totals[0]
        return (generated - before) / (now - when) if now > when and generated >= before else 0.0


def _adapters_in_use(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """Distinct adapters vLLM's newest `lora_requests_info` sample names as running or waiting."""
    newest: tuple[float, set[str]] = (-1.0, set())
    for (name, labels), value in samples.items():
        if name != "vllm:lora_requests_info":
            continue
        found = dict(labels)
        names = {
            n
            for key in ("running_lora_adapters", "waiting_lora_adapters")
            for n in found.get(key, "").split(",")
            if n
        }
        if value >= newest[0]:  # the value is the sample's time: the newest says what is in use now
            newest = (value, names)
    return float(len(newest[1]))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(_PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(_PREFIX + name, doc, value=value)
