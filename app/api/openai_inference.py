"""The control plane's OpenAI inference routes: `/v1/chat/completions` and `/v1/completions` for any of
the caller's models (sent through the serving proxy's machinery: signed tenant assertion, admission
limits, replica routing, streaming), and `/v1/models`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api import openai_presenters as present
from app.api import openai_schemas as oa
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.api.serving_proxy import Target, forward_to
from app.context import AppContext
from app.errors import InvalidInputError
from app.services import auth, deployments, openai_models
from app.supervision.serving_processes import ServingSupervisor

router = APIRouter(tags=["openai"])
MAX_MODEL_CHARS = 512


# The body goes to the serving process as sent (it checks the rest); documented for clients and fuzzers.
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"model": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_CHARS}},
                    "required": ["model"],
                }
            }
        },
    }
}


@router.post("/v1/chat/completions", openapi_extra=_BODY)
async def chat_completions(request: Request) -> StreamingResponse:
    return await _forward(request, "/v1/chat/completions")


@router.post("/v1/completions", openapi_extra=_BODY)
async def completions(request: Request) -> StreamingResponse:
    return await _forward(request, "/v1/completions")


async def _forward(request: Request, upstream_path: str) -> StreamingResponse:
    model = _model_of(await request.body())  # the body is kept: forward_to reads it again
    ctx: AppContext = request.app.state.ctx
    serving: ServingSupervisor = request.app.state.serving
    authorization = request.headers.get("authorization")
    target = await run_in_threadpool(_resolve, ctx, serving, authorization, model)
    return await forward_to(request, target, upstream_path)


def _model_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidInputError("request body is not valid JSON") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
        raise InvalidInputError(
            "model: required, a base model's name or a fine-tuned model (repo/N); GET /v1/models lists them"
        )
    return model


def _resolve(ctx: AppContext, serving: ServingSupervisor, authorization: str | None, model: str) -> Target:
    with ctx.sessions() as session:
        user = auth.authenticate_header(session, authorization)
        if session.dirty:
            session.commit()  # last_used_at bookkeeping
        base_model = openai_models.base_model_of(session, user, model)
        view = openai_models.deployment_for(ctx.settings, serving, session, user, base_model)
        deployments.start(serving, session, user, view)
        return Target(tenant=user.tenant.name, base_model=view.base_model, name=view.name)


@router.get("/v1/models", response_model=oa.ModelList)
def list_models(ctx: CtxDep, session: SessionDep, user: CurrentUser) -> oa.ModelList:
    data = [
        oa.Model(id=ref, created=present.epoch(version.created_at) or 0, owned_by=user.tenant.name)
        for ref, version in openai_models.adapter_ids(session, user)
    ]
    data += [
        oa.Model(id=name, created=0, owned_by="tuneforge")
        for name in openai_models.servable_base_models(ctx.settings, session)
    ]
    return oa.ModelList(data=data)


@router.get("/v1/models/{model:path}", response_model=oa.Model)
def retrieve_model(model: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> oa.Model:
    version = openai_models.find_model(ctx.settings, session, user, model)
    if version is None:
        return oa.Model(id=model, created=0, owned_by="tuneforge")
    return oa.Model(id=model, created=present.epoch(version.created_at) or 0, owned_by=user.tenant.name)
