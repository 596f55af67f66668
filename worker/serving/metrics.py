"""Prometheus metrics of one serving process, in a registry of its own (the server exposes it at /metrics)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    """Everything the engine counts. Only the engine thread writes; scrapes read concurrently."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.running = Gauge(
            "tuneforge_serving_running_sequences", "Sequences in the running batch", registry=r
        )
        self.waiting = Gauge(
            "tuneforge_serving_waiting_sequences", "Sequences waiting for a slot", registry=r
        )
        self.kv_blocks_used = Gauge("tuneforge_serving_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge(
            "tuneforge_serving_kv_blocks_total", "KV-cache blocks in all", registry=r
        )
        self.generated_tokens = Counter(
            "tuneforge_serving_generated_tokens", "Tokens generated, all requests", registry=r
        )
        self.prompt_tokens = Counter("tuneforge_serving_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.tokens_per_second = Gauge(
            "tuneforge_serving_tokens_per_second",
            "Generated tokens per second over the last 10 s",
            registry=r,
        )
        self.requests = Counter(
            "tuneforge_serving_requests", "Finished requests by outcome", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "tuneforge_serving_time_to_first_token_seconds",
            "Submission to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tuneforge_serving_inter_token_latency_seconds",
            "Time between consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_hits = Counter(
            "tuneforge_serving_adapter_cache_hits", "Adapter found loaded", registry=r
        )
        self.adapter_misses = Counter(
            "tuneforge_serving_adapter_cache_misses", "Adapter not loaded on request", registry=r
        )
        self.adapter_loads = Counter(
            "tuneforge_serving_adapter_loads", "Adapter loads by outcome", ["outcome"], registry=r
        )
        self.adapter_evictions = Counter(
            "tuneforge_serving_adapter_evictions", "Adapters evicted by the LRU bound", registry=r
        )
        self.adapters_loaded = Gauge("tuneforge_serving_adapters_loaded", "Adapters in memory", registry=r)
        self.spec_steps = Counter(
            "tuneforge_serving_speculative_steps", "Verification steps of speculating sequences", registry=r
        )
        self.spec_drafted = Counter(
            "tuneforge_serving_speculative_draft_tokens", "Draft tokens proposed and verified", registry=r
        )
        self.spec_accepted = Counter(
            "tuneforge_serving_speculative_accepted_tokens", "Draft tokens the model confirmed", registry=r
        )
        self.prefix_queries = Counter(
            "tuneforge_serving_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache at admission",
            registry=r,
        )
        self.prefix_hits = Counter(
            "tuneforge_serving_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not prefilled again)",
            registry=r,
        )
        self.prefix_cached_blocks = Gauge(
            "tuneforge_serving_prefix_cache_blocks", "KV blocks registered for prefix reuse", registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def record_step(self, new_tokens: int) -> None:
        """Called once per engine step with the tokens it generated; keeps the 10-second rate."""
        now = time.monotonic()
        self.generated_tokens.inc(new_tokens)
        self._recent.append((now, new_tokens))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        total = sum(n for _, n in self._recent)
        self.tokens_per_second.set(total / span if span > 0 else 0.0)
