"""Which deployment answers an OpenAI request for `model`, and the models `/v1/models` lists.

`model` is a base model's name or one of the tenant's adapters (`repo/N`, `repo/N@step`); either is
served by a deployment of that base model (the tenant's own or its default one), started on demand as
the serving proxy starts any deployment. A base model with no deployment is a 404 that says how to
create one: a deployment decides engine and replicas, which a chat request cannot choose for the caller.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge.rules import base_models as base_model_rules
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.served_models import model_key_of, version_uuid_of

from app.db import AdapterVersion, Repo, User, VersionStatus
from app.errors import InvalidInputError, NotFoundError
from app.services import base_models, deployments, versions
from app.services.deployments import DeploymentView
from app.settings import Settings


def base_model_of(session: Session, user: User, model: str) -> str:
    """The base model `model` runs on: itself, or the base an adapter of the caller's was trained on."""
    try:
        ref = AdapterRef.parse(model)
    except AdapterRefError:
        return model
    try:
        version = versions.resolve(session, user.tenant.name, ref).version
    except NotFoundError as exc:
        raise NotFoundError(f"model: {exc.message}; GET /v1/models lists the models you can use") from None
    if version.status != VersionStatus.COMPLETED and ref.step is None:
        raise InvalidInputError(
            f"model: {ref.version} is {version.status}; it can be served once its job has succeeded "
            "(or name one of its checkpoints, repo/N@step)"
        )
    return version.base_model


def deployment_for(session: Session, user: User, base_model: str) -> DeploymentView:
    """The caller's first deployment (the default one first) whose base model is `base_model`."""
    names = base_model_rules.aliases(base_model)
    for view in deployments.list_deployments(session, user):
        if version_uuid_of(view.base_model) is None and model_key_of(view.base_model) in names:
            return view
    raise NotFoundError(
        f"model: no deployment serves base model {base_model!r}; create one with POST /v2/deployments "
        f'{{"name": ..., "config": {{"baseModel": {base_model!r}}}}} and send the request again'
    )


def adapter_ids(session: Session, user: User) -> list[tuple[str, AdapterVersion]]:
    """The caller's completed, unarchived adapter versions as `repo/N`, newest first."""
    query = (
        select(AdapterVersion)
        .join(Repo, AdapterVersion.repo_id == Repo.id)
        .where(
            Repo.tenant_id == user.tenant_id,
            AdapterVersion.status == VersionStatus.COMPLETED,
            AdapterVersion.archived.is_(False),
        )
        .order_by(AdapterVersion.created_at.desc(), AdapterVersion.id.desc())
        .limit(MAX_LISTED_ADAPTERS)
    )
    return [(versions.version_id(v), v) for v in session.scalars(query).unique()]


# /v1/models has no pagination in OpenAI's API; past this many adapters GET /v2/repos lists the rest.
MAX_LISTED_ADAPTERS = 10_000


def servable_base_models(settings: Settings, session: Session) -> list[str]:
    return [m.name for m in base_models.catalogue(settings, session, count_parameters=False) if m.servable]
