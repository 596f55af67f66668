"""Deployment routes (Predibase v2): create, list, get, update, delete, and the events the SDK polls."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session

from app.api import deployment_schemas as schemas
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.services import deployment_metrics, deployments
from app.services.deployments import DeploymentView
from app.settings import Settings
from app.supervision.serving_processes import ServingSupervisor

router = APIRouter(tags=["deployments"])


def get_serving(request: Request) -> ServingSupervisor:
    serving: ServingSupervisor = request.app.state.serving
    return serving


ServingDep = Annotated[ServingSupervisor, Depends(get_serving)]


def present(
    settings: Settings, session: Session, serving: ServingSupervisor, view: DeploymentView
) -> schemas.DeploymentPublic:
    status = deployments.status(serving, view)
    return schemas.DeploymentPublic(
        name=view.name,
        uuid=view.uuid,
        description=view.description,
        type="shared" if view.is_default else "dedicated",
        status=status,
        model=schemas.DeploymentModel(
            name=view.model_name,
            max_input_length=deployments.context_length(settings, session, view.context_model),
        ),
        accelerator=schemas.Accelerator(id="any"),
        current_replicas=len(serving.ready_urls(view.base_model)),
        config=view.config,
        created_at=view.created_at.isoformat(),
    )


@router.post("/v2/deployments", response_model=schemas.DeploymentPublic)
def create_deployment(
    body: schemas.DeploymentCreate, ctx: CtxDep, serving: ServingDep, session: SessionDep, user: CurrentUser
) -> schemas.DeploymentPublic:
    args = (ctx.settings, serving, session, user)
    view = deployments.create(*args, body.name, body.config, body.description)
    return present(ctx.settings, session, serving, view)


@router.get("/v2/deployments", response_model=dict[str, list[schemas.DeploymentPublic]])
def list_deployments(
    ctx: CtxDep, serving: ServingDep, session: SessionDep, user: CurrentUser
) -> dict[str, list[schemas.DeploymentPublic]]:
    views = deployments.list_deployments(session, user)
    return {"data": [present(ctx.settings, session, serving, view) for view in views]}


@router.get("/v2/deployments/{name}", response_model=dict[str, schemas.DeploymentPublic])
def get_deployment(
    name: str, ctx: CtxDep, serving: ServingDep, session: SessionDep, user: CurrentUser
) -> dict[str, schemas.DeploymentPublic]:
    return {"data": present(ctx.settings, session, serving, deployments.get(session, user, name))}


@router.put("/v2/deployments/{name}", response_model=dict[str, schemas.DeploymentPublic])
def update_deployment(
    name: str,
    body: schemas.DeploymentUpdate,
    ctx: CtxDep,
    serving: ServingDep,
    session: SessionDep,
    user: CurrentUser,
) -> dict[str, schemas.DeploymentPublic]:
    args = (ctx.settings, serving, session, user)
    view = deployments.update(*args, name, body.config, body.description)
    return {"data": present(ctx.settings, session, serving, view)}


@router.delete("/v2/deployments/{name}")
def delete_deployment(
    name: str, serving: ServingDep, session: SessionDep, user: CurrentUser
) -> dict[str, Any]:
    deployments.delete(serving, session, user, name)
    return {}


@router.get("/v2/deployments/{name}/metrics", response_model=schemas.DeploymentMetricsPublic)
def get_deployment_metrics(
    name: str, serving: ServingDep, session: SessionDep, user: CurrentUser
) -> schemas.DeploymentMetricsPublic:
    view = deployments.get(session, user, name)
    metrics = deployment_metrics.read(serving, view, user.tenant.name)
    return schemas.DeploymentMetricsPublic.model_validate(metrics)


@router.get("/llms/{name}/events", response_model=schemas.DeploymentEvents)
def deployment_events(
    name: str, serving: ServingDep, session: SessionDep, user: CurrentUser, detailed: bool = False
) -> schemas.DeploymentEvents:
    view = deployments.get(session, user, name)
    events = [
        schemas.ComputeEvent(
            eventType=e.kind, timestamp=e.at.isoformat(), message=e.message if detailed else ""
        )
        for e in deployments.events(serving, view)
    ]
    status = deployments.status(serving, view)
    return schemas.DeploymentEvents(ComputeEvents=events, deploymentStatus=status, name=view.name)
