"""The app factory: Settings → AppContext → FastAPI with routers, error handlers and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app import dashboard
from app.api import (
    adapters,
    base_models,
    blobs,
    datasets,
    deployments,
    health,
    jobs,
    openai_files,
    openai_inference,
    openai_jobs,
    repos,
    serving_proxy,
    users,
)
from app.api.blob_transfers import BlobTransfers
from app.api.request_guards import RefuseNulMiddleware
from app.context import AppContext
from app.errors import install_error_handlers
from app.observability import MetricsMiddleware, RequestMetrics
from app.services.job_sweeper import JobSweeper
from app.services.quotas import ServingLimits
from app.settings import Settings
from app.supervision.serving_processes import ServingSupervisor

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Called with no argument by `uvicorn --factory app.main:create_app` (settings from the environment)."""
    ctx = AppContext.from_settings(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Also sends datasets to the validate workers that the broker never got.
        sweeper = JobSweeper(ctx, ctx.settings.sweep_interval_seconds)
        sweeper.start()
        try:
            yield
        finally:
            await serving_proxy.close_http_client(app)
            app.state.serving.close()  # stops the serving processes this control plane started
            sweeper.stop()
            ctx.close()

    app = FastAPI(title="tuneforge", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.serving = ServingSupervisor(ctx.settings)
    app.state.serving_limits = ServingLimits.from_settings(ctx.settings)
    app.state.blob_transfers = BlobTransfers(
        ctx.settings.blob_transfer_limit, ctx.settings.blob_idle_timeout_seconds
    )
    app.state.metrics = RequestMetrics(CollectorRegistry())
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RefuseNulMiddleware)
    install_error_handlers(app)
    routers = (health, users, datasets, repos, adapters, jobs, base_models, blobs, deployments)
    for module in (*routers, openai_files, openai_jobs, openai_inference):
        app.include_router(module.router)
    dashboard.mount(app)
    # Last: its `/{tenant}/...` paths must not shadow any fixed route.
    app.include_router(serving_proxy.router)
    return app
