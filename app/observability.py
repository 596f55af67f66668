"""Prometheus request metrics: counts and latencies per route template, on a per-app registry."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["method", "route", "status"]
        self.requests = Counter("tuneforge_http_requests", "HTTP requests served", labels, registry=registry)
        self.latency = Histogram(
            "tuneforge_http_request_duration_seconds",
            "Time to serve an HTTP request (to the last body byte)",
            ["method", "route"],
            registry=registry,
        )


class MetricsMiddleware:
    """Pure ASGI, so streaming responses are timed to their end and nothing is buffered."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    # Templates, not raw paths: one series per route, not one per dataset name.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
