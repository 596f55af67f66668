"""The HTTP server of one base model: OpenAI and LoRAX routes (generation, embeddings, classification)
over one `AsyncEngine`, health and metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.serving import classify_routes, embeddings_routes, lorax_routes, openai_routes
from worker.serving.errors import ServingError
from worker.serving.http_common import RESPONSE_HEADERS_STATE, error_body, error_code, is_openai_path
from worker.serving.params import DEFAULT_MAX_BODY_BYTES
from worker.serving.tenant_auth import TenantAuth, TenantAuthMiddleware

if TYPE_CHECKING:
    from worker.serving.engine_api import ServingEngine

log = logging.getLogger(__name__)


def build_app(
    engine: ServingEngine, *, tenants: TenantAuth, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The app over a started engine; `tenants` says who a request is from: `SignedTenants` verifies
    the control plane's assertion, `TrustedTenant` (tests, benchmarks) trusts one fixed tenant.
    A request body over `max_body_bytes` is answered 413 before it is parsed (or its signature read)."""
    app = FastAPI(title=f"tuneforge serving: {engine.model_name}", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(TenantAuthMiddleware, auth=tenants)
    app.state.started_at = time.time()
    app.include_router(openai_routes.router)
    app.include_router(lorax_routes.router)
    app.include_router(embeddings_routes.router)
    app.include_router(classify_routes.router)
    app.add_api_route("/health", health, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", metrics, methods=["GET"], response_model=None)
    app.add_exception_handler(ServingError, _serving_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(ResponseHeaders)
    # Added last, so outermost: no body over the limit is buffered, not even to check its signature.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


class ResponseHeaders:
    """Adds the headers a route left in the request's state (`RESPONSE_HEADERS_STATE`) to its response,
    whether the route returned it or a streaming response starts it later."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = scope.setdefault("state", {}).setdefault(RESPONSE_HEADERS_STATE, {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Reads the request body up to `max_bytes` before the app sees it; a larger one is a 413 at once.

    The declared Content-Length is checked first; a chunked body is counted as it arrives. The app then
    gets the body in one message, and later `receive()` calls (disconnect detection) go to the client.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its request was whole: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"the request body is over {self.max_bytes} bytes; send a shorter prompt"
        body = error_body(scope["path"], 413, message, None, "request_too_large")
        await JSONResponse(body, status_code=413)(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


async def health(request: Request) -> Response:
    """200 once the model is loaded and the engine loop runs; 503 otherwise (a load balancer's cue)."""
    engine: ServingEngine = request.app.state.engine
    ready = engine.ready
    body = {"status": "ok" if ready else "unavailable", "model": engine.model_name}
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    registry = request.app.state.engine.metrics.registry
    # A collection may read another process (vLLM's /metrics): off the event loop.
    return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)


async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    # The engine names the adapter `adapter_id` (LoRAX's word); OpenAI's clients sent it as `model`.
    field = "model" if exc.field == "adapter_id" and is_openai_path(request.url.path) else exc.field
    body = error_body(request.url.path, exc.status_code, exc.message, field, error_code(exc))
    return JSONResponse(body, status_code=exc.status_code)


# pydantic's location parts that name a member of a union type rather than a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not parse: 422 naming the first offending field, in the route's error shape."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        field, message = None, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    else:
        field = _field_path(first.get("loc", ()))
        reason = first.get("msg", "invalid value")
        message = f"{field}: {reason}" if field else f"invalid request body: {reason}"
    return JSONResponse(
        error_body(request.url.path, 422, message, field, "invalid_parameter"), status_code=422
    )


def _field_path(location: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` → `messages[0].role`; union member tags are dropped."""
    path = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in str(part) or str(part).startswith(("function-", "constrained-")):
            break
        else:
            path += f".{part}" if path else str(part)
    return path or None


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
    message = "internal error; the request was not completed (the server log has details)"
    return JSONResponse(error_body(request.url.path, 500, message, None, "internal_error"), status_code=500)
