"""Liveness, readiness (database + storage reachable) and the Prometheus scrape endpoint.

/readyz is unauthenticated: it says what is unreachable, never why (exception text names hosts,
paths and credentials' users); the why goes to the log.
"""

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import CtxDep

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ctx: CtxDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:
        log.warning("readiness: the database is unreachable", exc_info=True)
        checks["database"] = "unreachable"
    try:
        ctx.store.check()
        checks["storage"] = "ok"
    except Exception:
        log.warning("readiness: the blob store is unreachable", exc_info=True)
        checks["storage"] = "unreachable"
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        body = {"error": f"not ready: {', '.join(failing)} unreachable", "checks": checks}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
