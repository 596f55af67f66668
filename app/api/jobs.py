"""Fine-tuning job routes (Predibase v2): create, list, get, timeline, cancel, metrics and their streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, WebSocket
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from app.api import presenters, schemas
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.context import AppContext
from app.errors import ServiceError
from app.services import auth, finetuning, job_stream, jobs

router = APIRouter(tags=["finetuning"])
JOB_PATH = "/v2/finetuning/jobs/{job_uuid}"


@router.post("/v2/finetuning/jobs", response_model=schemas.FinetuningJobPublic)
def create_job(
    body: schemas.FinetuningJobCreate, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> schemas.FinetuningJobPublic:
    job = finetuning.create_job(
        ctx,
        session,
        user,
        params=body.params,
        dataset_ref=body.dataset,
        repo_ref=body.repo,
        description=body.description,
        continue_from_version=body.continue_from_version,
    )
    return presenters.job(job)


@router.get("/v2/finetuning/jobs", response_model=schemas.ListEnvelope[schemas.FinetuningJobPublic])
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=schemas.MAX_PAGE_OFFSET)] = 0,
) -> schemas.ListEnvelope[schemas.FinetuningJobPublic]:
    rows, total = finetuning.list_jobs(session, user, limit, offset)
    return schemas.ListEnvelope(data=[presenters.job(r) for r in rows], count=total)


# Registered before JOB_PATH so that "cost-estimate" is not taken for a job uuid. The SDK sends a
# GET with a JSON body (and older ones POST to estimate_cost); both get an answer, never a 5xx.
@router.get("/v2/finetuning/jobs/cost-estimate", response_model=schemas.CostEstimate)
@router.post("/v2/finetuning/jobs/estimate_cost", response_model=schemas.CostEstimate)
def cost_estimate(
    ctx: CtxDep, session: SessionDep, user: CurrentUser, body: Annotated[Any, Body()] = None
) -> schemas.CostEstimate:
    return schemas.CostEstimate(total_steps=finetuning.estimate_steps(ctx, session, user, body))


@router.get(JOB_PATH, response_model=schemas.FinetuningJobPublic)
def get_job(job_uuid: str, session: SessionDep, user: CurrentUser) -> schemas.FinetuningJobPublic:
    return presenters.job(finetuning.get(session, user, job_uuid))


@router.get(JOB_PATH + "/timeline")
def job_timeline(job_uuid: str, session: SessionDep, user: CurrentUser) -> dict[str, dict[str, str]]:
    return jobs.timeline(session, finetuning.get(session, user, job_uuid))


@router.post(JOB_PATH + "/cancel", response_model=schemas.FinetuningJobPublic)
def cancel_job(job_uuid: str, session: SessionDep, user: CurrentUser) -> schemas.FinetuningJobPublic:
    job = finetuning.get(session, user, job_uuid)
    jobs.request_cancel(session, job)
    session.commit()
    return presenters.job(job)


@router.get(JOB_PATH + "/metrics", response_model=schemas.ListEnvelope[schemas.JobMetricPublic])
def job_metrics(
    job_uuid: str, session: SessionDep, user: CurrentUser
) -> schemas.ListEnvelope[schemas.JobMetricPublic]:
    rows = jobs.metrics(session, finetuning.get(session, user, job_uuid))
    return schemas.ListEnvelope(data=[presenters.metric(r) for r in rows], count=len(rows))


@router.get(JOB_PATH + "/metrics/stream")
def stream_metrics_sse(
    job_uuid: str, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> StreamingResponse:
    """Server-Sent Events twin of the WebSocket: `data: <frame>` per row, `: keep-alive` when idle."""
    job_id = finetuning.get(session, user, job_uuid).id
    return StreamingResponse(
        _sse(ctx, job_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _sse(ctx: AppContext, job_id: int) -> AsyncIterator[str]:
    async for item in job_stream.frames(ctx, job_id):
        yield ": keep-alive\n\n" if item.keepalive else f"data: {json.dumps(item.body)}\n\n"


@router.websocket(JOB_PATH + "/metrics/stream")
async def stream_metrics_ws(websocket: WebSocket, job_uuid: str) -> None:
    """What `pb.adapters.create` watches: replays history, follows live, closes after `is_completed`."""
    ctx: AppContext = websocket.app.state.ctx
    try:
        job_id = await run_in_threadpool(
            _authorized_job_id, ctx, websocket.headers.get("authorization"), job_uuid
        )
    except ServiceError as exc:
        # Refused during the handshake: the client sees an HTTP error status, not an open socket.
        await websocket.close(code=1008, reason=exc.message[:120])
        return
    await websocket.accept()
    sdk = websocket.headers.get("user-agent", "").startswith(job_stream.PREDIBASE_SDK_AGENT)
    if await _send_until_disconnect(websocket, _ws_messages(ctx, job_id, sdk)):
        await websocket.close()


async def _ws_messages(ctx: AppContext, job_id: int, sdk: bool) -> AsyncIterator[str]:
    # A keep-alive repeats the latest frame: every client already takes a frame it has seen.
    async for item in job_stream.frames(ctx, job_id):
        yield json.dumps(job_stream.for_predibase_sdk(item.body) if sdk else item.body)


async def _send_until_disconnect(websocket: WebSocket, messages: AsyncIterator[str]) -> bool:
    """Send every message; True when all went, False when the client left first.

    The client's side is read meanwhile, so a watcher that goes away stops the polling at once
    instead of at the next send (which, for a job still queued, may be hours away).
    """

    async def send_all() -> None:
        async for message in messages:
            await websocket.send_text(message)

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # nothing a client sends here means anything

    sender, receiver = asyncio.create_task(send_all()), asyncio.create_task(until_disconnect())
    done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    for task in (sender, receiver):
        task.cancel()
    await asyncio.gather(sender, receiver, return_exceptions=True)
    if sender not in done:
        return False  # the receiver ends only when the client has gone
    error = sender.exception()
    if isinstance(error, WebSocketDisconnect | OSError):
        return False
    if error is not None:
        raise error  # a broken stream is the server's fault: logged, and the client sees 1011
    return True


def _authorized_job_id(ctx: AppContext, authorization: str | None, job_uuid: str) -> int:
    with ctx.sessions() as session:
        user = auth.authenticate_header(session, authorization)
        session.commit()
        return finetuning.get(session, user, job_uuid).id
