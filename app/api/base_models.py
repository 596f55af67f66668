"""Base-model routes: what a job or deployment may name on this cluster (`GET /v2/base-models[/{name}]`)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import schemas
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.services import base_models
from app.services.base_models import AvailableModel

router = APIRouter(tags=["base-models"])


def present(model: AvailableModel) -> schemas.BaseModelPublic:
    return schemas.BaseModelPublic(
        name=model.name,
        description=model.description,
        builtin=model.builtin,
        source=model.source,
        architecture=model.model_type,
        parameter_count=model.parameter_count,
        context_length=model.context_length,
        servable=model.servable,
        chat_template=model.chat_template,
    )


@router.get("/v2/base-models", response_model=schemas.ListEnvelope[schemas.BaseModelPublic])
def list_base_models(
    ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> schemas.ListEnvelope[schemas.BaseModelPublic]:
    models = [present(model) for model in base_models.catalogue(ctx.settings, session)]
    return schemas.ListEnvelope(data=models, count=len(models))


@router.get("/v2/base-models/{name:path}", response_model=schemas.BaseModelPublic)
def get_base_model(name: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> schemas.BaseModelPublic:
    return present(base_models.get(ctx.settings, session, name))
