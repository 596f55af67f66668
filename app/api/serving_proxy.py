"""`/{tenant}/deployments/v2/llms/{name}/...`: the serving URL, forwarded to the deployment's server.

The caller's token decides the tenant: the path's tenant segment must be the caller's own (its name
or its short code, which is what the Predibase SDK puts there), and the tenant the serving process
resolves adapters in travels in an assertion signed here (`tuneforge.serving_auth`), never taken
from the caller. Responses stream through as they arrive (Server-Sent Events included), without
buffering.

A serving key may have several replicas: each request goes to the one `supervision.routing` picks for
its tenant and adapter (the OpenAI `model`, LoRAX's `parameters.adapter_id`), so an adapter's requests
meet the replica that has it loaded; one that cannot be reached is retried once on the next replica.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from tuneforge.serving_auth import ASSERTION_HEADER

from app.api.serving_admission import SlotResponse, admit
from app.context import AppContext
from app.errors import NotFoundError
from app.services import auth, deployments
from app.supervision import routing
from app.supervision.serving_processes import ReplicaLease, ServingSupervisor, ServingUnavailableError

router = APIRouter(tags=["serving"])
log = logging.getLogger(__name__)

PREFIX = "/{tenant}/deployments/v2/llms/{name}"
# (method, path under the deployment URL) → path on the serving process.
ROUTES = {
    ("POST", "generate"): "/generate",
    ("POST", "generate_stream"): "/generate_stream",
    ("POST", "v1/completions"): "/v1/completions",
    ("POST", "v1/chat/completions"): "/v1/chat/completions",
    ("POST", "v1/embeddings"): "/v1/embeddings",
    ("POST", "embed"): "/embed",
    ("POST", "classify"): "/classify",
    ("POST", "classify_batch"): "/classify_batch",
    ("GET", "v1/models"): "/v1/models",
    ("GET", "health"): "/health",
}
# Hop-by-hop headers (RFC 9110 §7.6.1) and what the proxy sets itself.
_DROPPED_REQUEST_HEADERS = {
    "host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "authorization", "content-length", "cookie", ASSERTION_HEADER.lower(),
}  # fmt: skip
_DROPPED_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
# Generation can be long; only connecting is expected to be quick.
UPSTREAM_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass(frozen=True)
class Target:
    tenant: str
    base_model: str  # the serving key
    name: str  # the deployment's


@router.post(PREFIX)
async def generate(tenant: str, name: str, request: Request) -> StreamingResponse:
    """LoRAX's `POST /`: a one-element list, or Server-Sent Events when the body says `stream: true`."""
    return await forward(request, tenant, name, "/")


# One route per method: a shared one gives both the same OpenAPI operation id.
@router.get(PREFIX + "/{path:path}", operation_id="serving_route_get")
@router.post(PREFIX + "/{path:path}", operation_id="serving_route_post")
async def serving_route(tenant: str, name: str, path: str, request: Request) -> StreamingResponse:
    upstream = ROUTES.get((request.method, path.strip("/")))
    if upstream is None:
        raise NotFoundError(f"no serving route {request.method} .../{path}")
    return await forward(request, tenant, name, upstream)


async def forward(request: Request, tenant: str, name: str, upstream_path: str) -> StreamingResponse:
    ctx: AppContext = request.app.state.ctx
    serving: ServingSupervisor = request.app.state.serving
    authorization = request.headers.get("authorization")
    target = await run_in_threadpool(_resolve, ctx, serving, authorization, tenant, name)
    return await forward_to(request, target, upstream_path)


async def forward_to(request: Request, target: Target, upstream_path: str) -> StreamingResponse:
    """Send the request to `target` (a started deployment the caller may use) under the tenant's
    admission limits, and stream the answer back."""
    ctx: AppContext = request.app.state.ctx
    serving: ServingSupervisor = request.app.state.serving
    slot = admit(request, target.tenant)
    try:
        response, lease = await _open_upstream(request, ctx, serving, target, upstream_path)
    except BaseException:
        slot.release()
        raise
    kept = {k: v for k, v in response.headers.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS}
    kept["X-Accel-Buffering"] = "no"  # and no proxy in front should buffer Server-Sent Events either
    return SlotResponse(
        slot,
        response,
        _relay(response),
        status_code=response.status_code,
        headers=kept,
        on_close=lease.release,
    )


async def _open_upstream(
    request: Request, ctx: AppContext, serving: ServingSupervisor, target: Target, upstream_path: str
) -> tuple[httpx.Response, ReplicaLease]:
    """The streaming response of the replica routing picks, and its lease; a replica that cannot be
    reached is reported and the request sent once more, to another replica where there is one."""
    # Read whole (generation requests are small) so that a request can be sent again after a restart.
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_REQUEST_HEADERS}
    route = routing.route_key(target.tenant, adapter_of(body, target))
    timeout = ctx.settings.serving_start_timeout_seconds
    client = _http_client(request.app)
    avoid: set[int] = set()
    for attempt in range(2):
        lease = await serving.acquire(target.base_model, route, timeout, frozenset(avoid))
        url = lease.url + upstream_path
        try:
            # Signed per attempt, just before sending: assertions live seconds, a start can take longer.
            signed = headers | serving.signed_headers(target.tenant, request.method, url, body)
            upstream = client.build_request(
                request.method, url, content=body, headers=signed, params=request.query_params
            )
            return await client.send(upstream, stream=True), lease
        except httpx.TransportError as exc:
            lease.release()
            # Died since its last health check: look now; the next acquire starts ours again.
            await run_in_threadpool(serving.report_unreachable, target.base_model, lease.index)
            log.warning(
                "serving %s replica %d unreachable at %s: %r", target.base_model, lease.index, url, exc
            )
            if serving.replica_count(target.base_model) > 1:
                avoid.add(lease.index)  # the retry goes to the next replica, never the same one
            if attempt == 1:
                # The transport error names the shared process's address: the log has it, not the caller.
                raise ServingUnavailableError(
                    f"deployment {target.name!r}: its serving process cannot be reached; retry shortly"
                ) from exc
        except BaseException:
            lease.release()
            raise
    raise AssertionError("unreachable: the second attempt returns or raises")


def adapter_of(body: bytes, target: Target) -> str:
    """The adapter a request names ("" for the base model), for routing only: a body that is not the
    JSON expected routes as the base model, and the serving process answers it with the 400."""
    try:
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return ""
    if not isinstance(data, dict):
        return ""
    model = data.get("model")
    if isinstance(model, str):  # OpenAI: the deployment or base model's own name is the base model
        return "" if model in (target.name, target.base_model) else model
    parameters = data.get("parameters")
    adapter = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    if adapter is None:  # /classify takes it at the top level too
        adapter = data.get("adapter_id")
    return adapter if isinstance(adapter, str) else ""


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    # Closing the upstream response when the caller goes away tells the serving process to free the slot.
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def _resolve(
    ctx: AppContext, serving: ServingSupervisor, authorization: str | None, tenant: str, name: str
) -> Target:
    """The caller's tenant and the deployment's base model, whose server is started if it is not."""
    with ctx.sessions() as session:
        user = auth.authenticate_header(session, authorization)
        if session.dirty:
            session.commit()  # last_used_at bookkeeping
        if tenant not in (user.tenant.name, user.tenant.short_code):
            # Another tenant's URL answers like a missing deployment: its existence is not revealed.
            raise NotFoundError(f"deployment {name!r} not found")
        view = deployments.get(session, user, name)
        deployments.start(serving, session, user, view)
        return Target(tenant=user.tenant.name, base_model=view.base_model, name=name)


async def close_http_client(app: FastAPI) -> None:
    client: httpx.AsyncClient | None = getattr(app.state, "serving_http", None)
    if client is not None:
        await client.aclose()


def _http_client(app: FastAPI) -> httpx.AsyncClient:
    client: httpx.AsyncClient | None = getattr(app.state, "serving_http", None)
    if client is None:
        client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT)
        app.state.serving_http = client
    return client
