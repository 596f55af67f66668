"""Which deployment answers an OpenAI request for `model`, and the models `/v1/models` lists.

`model` is a base model's name or one of the tenant's adapters (`repo/N`, `repo/N@step`); either is
served by a deployment of that base model (the tenant's own or its default one), started on demand as
the serving proxy starts any deployment. A base model the tenant has no deployment of gets one with the
defaults of `POST /v2/deployments` (engine, replicas), named after it: an OpenAI client chats with its
`fine_tuned_model` as soon as the job succeeds; a team that wants other settings creates the deployment.
"""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge.rules import base_models as base_model_rules
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.names import MAX_NAME_LENGTH
from tuneforge.rules.served_models import model_key_of, version_uuid_of

from app.db import AdapterVersion, Repo, User, VersionStatus
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.services import base_models, deployments, versions
from app.services.deployments import DeploymentView
from app.settings import Settings
from app.supervision.serving_processes import ServingSupervisor


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


def deployment_for(
    settings: Settings, serving: ServingSupervisor, session: Session, user: User, base_model: str
) -> DeploymentView:
    """The caller's first deployment (the default one first) whose base model is `base_model`; one is
    created with the default settings when there is none."""
    names = base_model_rules.aliases(base_model)
    for view in deployments.list_deployments(session, user):
        if version_uuid_of(view.base_model) is None and model_key_of(view.base_model) in names:
            return view
    name = auto_deployment_name(base_model)
    try:
        return deployments.create(
            settings, serving, session, user, name, {"baseModel": base_model}, AUTO_DESCRIPTION
        )
    except InvalidInputError as exc:  # not a base model this cluster has
        session.rollback()
        raise InvalidInputError(
            f"model: {base_model!r} is neither one of your fine-tuned models nor a base model this cluster "
            f"serves; GET /v1/models lists them ({exc.message})"
        ) from None
    except ConflictError:
        # Another request made it first, or the tenant has a deployment of that name serving another
        # model: the former is found by name, the latter is the caller's to resolve.
        session.rollback()
        found = deployments.get(session, user, name)
        if model_key_of(found.base_model) in names:
            return found
        raise ConflictError(
            f"model: no deployment serves base model {base_model!r}, and the name {name!r} is taken by "
            "another deployment; create one with POST /v2/deployments "
            f'{{"name": ..., "config": {{"baseModel": {base_model!r}}}}}'
        ) from None


AUTO_DESCRIPTION = "created for an OpenAI-compatible request to a model of this base model"


def auto_deployment_name(base_model: str) -> str:
    """A deployment name for `base_model` (org/name@revision): the characters names allow, made unique by a
    short digest where characters had to be replaced."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model).replace("..", ".").strip("-.")
    if cleaned == base_model:
        return cleaned[:MAX_NAME_LENGTH]
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:8]
    return f"{cleaned[: MAX_NAME_LENGTH - 9]}-{digest}"


def find_model(settings: Settings, session: Session, user: User, model: str) -> AdapterVersion | None:
    """A model `/v1/models` lists: the caller's completed, unarchived adapter version, or None for a
    base model this cluster serves; NotFoundError for anything else."""
    missing = NotFoundError(f"model: {model!r} not found; GET /v1/models lists the models you can use")
    try:
        ref = AdapterRef.parse(model)
    except AdapterRefError:
        if model in servable_base_models(settings, session):
            return None
        raise missing from None
    try:
        version = versions.resolve(session, user.tenant.name, ref).version
    except NotFoundError:
        raise missing from None
    if version.status != VersionStatus.COMPLETED or version.archived:
        raise missing
    return version


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
