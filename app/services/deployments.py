"""Deployments per tenant (Predibase protocol): create, get, list, update, delete, status and events.

A deployment names a base model; serving it is the supervisor's job (`serving_processes`), shared by
every deployment of that base model. A deployment may instead name one of the tenant's own completed
adapter versions (`config.baseModel: "repo/N"`): that version, merged into its base (or, for full /
last_layer, its whole model), is served by a process of its own, keyed by the version's uuid
(`tuneforge.rules.served_models`), so no two tenants' `repo/N` ever share one. `config.engine` picks the
engine (tuneforge's or vLLM; settings.serving_engine when unnamed), which is part of the serving key: the
same base model on both engines is two sets of processes. Each tenant also has a default deployment of
the default base model, on tuneforge's engine, that exists without being created and cannot be changed
or deleted.

`config.maxReplicas` is how many replicas of its serving key the control plane runs (the largest
among the key's deployments); where an operator runs them (`TUNEFORGE_SERVING_URLS`), it may not ask
for more than are listed.
"""

from __future__ import annotations

import uuid as uuid_lib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.base_models import BaseModelNameError
from tuneforge.rules.served_models import (
    ENGINES,
    TUNEFORGE_ENGINE,
    VLLM_ENGINE,
    engine_key,
    engine_of,
    model_key_of,
    version_model_key,
    version_uuid_of,
)

from app.db import AdapterVersion, Deployment, Tenant, User
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.services import base_models, exports, versions
from app.services.names import validate_name
from app.settings import Settings
from app.supervision.serving_processes import ServingEvent, ServingStatus, ServingSupervisor

DEFAULT_DEPLOYMENT = "smollm2-135m"
DEFAULT_BASE_MODEL = "smollm2-135m"
DEFAULT_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class DeploymentView:
    """A stored deployment or the tenant's default one, in one shape."""

    name: str
    uuid: str
    description: str | None
    base_model: str
    config: dict[str, Any]
    created_at: datetime
    is_default: bool
    # The base model whose context the served model has: the base itself, or a served version's base.
    context_model: str = ""

    @property
    def model_name(self) -> str:
        """What the deployment serves, as its config names it: a base model, or `repo/N`."""
        if version_uuid_of(self.base_model) is not None:
            return str(self.config.get("baseModel", self.base_model))
        return model_key_of(self.base_model)

    @property
    def engine(self) -> str:
        return engine_of(self.base_model)

    @classmethod
    def of(cls, row: Deployment) -> DeploymentView:
        return cls(
            name=row.name,
            uuid=row.uuid,
            description=row.description,
            base_model=row.base_model,
            config=dict(row.config),
            created_at=_aware(row.created_at),
            is_default=False,
            context_model=_context_model(row),
        )

    @classmethod
    def default_for(cls, tenant: Tenant) -> DeploymentView:
        return cls(
            name=DEFAULT_DEPLOYMENT,
            # Stable per tenant, so clients can keep it like any other uuid.
            uuid=str(uuid_lib.uuid5(uuid_lib.UUID(tenant.uuid), DEFAULT_DEPLOYMENT)),
            description=f"the default {DEFAULT_BASE_MODEL} deployment; serves any adapter of that base model",
            base_model=DEFAULT_BASE_MODEL,
            config={
                "baseModel": DEFAULT_BASE_MODEL,
                "minReplicas": 0,
                "maxReplicas": 1,
                "engine": TUNEFORGE_ENGINE,
            },
            created_at=_aware(tenant.created_at),
            is_default=True,
            context_model=DEFAULT_BASE_MODEL,
        )


def validate_config(settings: Settings, session: Session, config: dict[str, Any]) -> dict[str, Any]:
    """The config as stored: None values dropped (the SDK sends every field), each known field checked.
    A `baseModel` of the form `repo/N` names an adapter version; `serving_key` checks that one."""
    cleaned = {key: value for key, value in config.items() if value is not None}
    base_model = cleaned.get("baseModel")
    if not isinstance(base_model, str) or not base_model:
        raise InvalidInputError("config.baseModel: required; name the base model to serve")
    cleaned["engine"] = _engine(settings, cleaned.get("engine", settings.serving_engine))
    version_ref = _version_ref(base_model)
    if version_ref is None:
        found = base_models.require_available(settings, session, base_model, field="config.baseModel")
        base_models.require_servable(found, "config.baseModel")
    replicas = {key: cleaned.get(key, default) for key, default in (("minReplicas", 0), ("maxReplicas", 1))}
    for key, value in replicas.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInputError(f"config.{key}: must be a whole number >= 0 (got {value!r})")
    if replicas["minReplicas"] > replicas["maxReplicas"]:
        raise InvalidInputError("config.minReplicas: must not exceed config.maxReplicas")
    # Replicas the control plane runs itself; the operator's are checked against their list once the
    # serving key is known (check_operator_replicas).
    operated = base_model in settings.serving_urls
    if replicas["maxReplicas"] > settings.serving_max_replicas and not operated:
        raise InvalidInputError(
            f"config.maxReplicas: at most {settings.serving_max_replicas} here (the operator's "
            f"TUNEFORGE_SERVING_MAX_REPLICAS; got {replicas['maxReplicas']})"
        )
    preloaded = cleaned.get("preloadedAdapters", [])
    if not isinstance(preloaded, list) or not all(_is_adapter_ref(a) for a in preloaded):
        raise InvalidInputError(
            f"config.preloadedAdapters: a list of adapter ids 'repo/N' or 'repo/N@step' (got {preloaded!r})"
        )
    if version_ref is not None and preloaded:
        raise InvalidInputError(
            f"config.preloadedAdapters: a deployment of adapter version {base_model} serves that version "
            "merged into its base, and no adapters besides; deploy its base model to serve adapters"
        )
    return cleaned


def check_operator_replicas(settings: Settings, key: str, config: dict[str, Any]) -> None:
    """Where the operator runs `key`'s replicas, a deployment cannot ask for more than are listed."""
    listed = settings.serving_urls.get(key)
    if not listed:
        return
    for field_name in ("minReplicas", "maxReplicas"):
        asked = config.get(field_name, 0)
        if isinstance(asked, int) and asked > len(listed):
            raise InvalidInputError(
                f"config.{field_name}: the operator runs {len(listed)} replica(s) of {config['baseModel']}"
                f" here (got {asked}); ask for at most {len(listed)}"
            )


def _engine(settings: Settings, engine: object) -> str:
    """`config.engine`, checked: one of the engines, and vLLM only where this cluster runs it."""
    if engine not in ENGINES:
        raise InvalidInputError(f"config.engine: one of {', '.join(ENGINES)} (got {engine!r})")
    runs_vllm = settings.vllm_python is not None or any(
        engine_of(key) == VLLM_ENGINE for key in settings.serving_urls
    )
    if engine == VLLM_ENGINE and not runs_vllm:
        raise InvalidInputError(
            "config.engine: this cluster does not run vLLM (its operator sets TUNEFORGE_VLLM_PYTHON to a "
            "vLLM environment, e.g. one `make vllm` builds, or names vLLM replicas in "
            "TUNEFORGE_SERVING_URLS); leave config.engine out to use tuneforge's engine"
        )
    return str(engine)


def serving_key(settings: Settings, session: Session, user: User, config: dict[str, Any]) -> str:
    """What serves a validated config (`validate_config`): its engine and `config.baseModel`, the base
    model's name or `version:<uuid>` for one of the tenant's own completed versions whose base model is
    available here (422 otherwise: another tenant's version is as unknown as a missing one)."""
    return engine_key(_model_key(settings, session, user, config["baseModel"]), config["engine"])


def _model_key(settings: Settings, session: Session, user: User, base_model: str) -> str:
    ref = _version_ref(base_model)
    if ref is None:
        return base_model
    try:
        version = versions.resolve(session, user.tenant.name, ref).version
    except versions.VersionNotFoundError:
        raise InvalidInputError(
            f"config.baseModel: adapter version {base_model} not found; name one of your own versions"
        ) from None
    if version.archived:
        raise InvalidInputError(f"config.baseModel: adapter version {base_model} is archived; unarchive it")
    exports.check_servable_as_model(version)
    found = base_models.require_available(settings, session, version.base_model, field="config.baseModel")
    base_models.require_servable(found, "config.baseModel")
    return version_model_key(version.uuid)


def _version_ref(text: str) -> AdapterRef | None:
    """`repo/N` (no checkpoint step): an adapter version named as a deployment's model."""
    try:
        ref = AdapterRef.parse(text)
    except AdapterRefError:
        return None
    return ref if ref.step is None else None


def _is_adapter_ref(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        AdapterRef.parse(value)
    except AdapterRefError:
        return False
    return True


def create(
    settings: Settings,
    serving: ServingSupervisor,
    session: Session,
    user: User,
    name: str,
    config: dict[str, Any],
    description: str | None,
) -> DeploymentView:
    validate_name(name, "name")
    cleaned = validate_config(settings, session, config)
    key = serving_key(settings, session, user, cleaned)
    check_operator_replicas(settings, key, cleaned)
    if name == DEFAULT_DEPLOYMENT or _find(session, user, name) is not None:
        raise ConflictError(f"name: deployment {name!r} already exists; pick another name or update it")
    row = Deployment(
        tenant_id=user.tenant_id,
        created_by_id=user.id,
        name=name,
        description=description,
        base_model=key,
        config=cleaned,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        raise ConflictError(f"name: deployment {name!r} already exists") from None
    view = DeploymentView.of(row)
    start(serving, session, user, view)
    return view


def start(serving: ServingSupervisor, session: Session, user: User, view: DeploymentView) -> None:
    """Make sure the deployment's base model is being served, with its adapters preloaded."""
    warmups = [(user.tenant.name, adapter) for adapter in view.config.get("preloadedAdapters", [])]
    serving.ensure_started(view.base_model, warmups, replicas=wanted_replicas(session, view.base_model))


def wanted_replicas(session: Session, key: str) -> int:
    """The largest maxReplicas among the key's deployments (the default one asks for one)."""
    configs = session.scalars(select(Deployment.config).where(Deployment.base_model == key))
    asked = [config.get("maxReplicas", 1) for config in configs]
    return max([1, *(n for n in asked if isinstance(n, int))])


def get(session: Session, user: User, name: str) -> DeploymentView:
    row = _find(session, user, name)
    if row is not None:
        return DeploymentView.of(row)
    if name == DEFAULT_DEPLOYMENT:
        return DeploymentView.default_for(user.tenant)
    raise NotFoundError(f"deployment {name!r} not found")


def list_deployments(session: Session, user: User) -> list[DeploymentView]:
    rows = session.scalars(
        select(Deployment).where(Deployment.tenant_id == user.tenant_id).order_by(Deployment.created_at)
    )
    return [DeploymentView.default_for(user.tenant)] + [DeploymentView.of(row) for row in rows]


def update(
    settings: Settings,
    serving: ServingSupervisor,
    session: Session,
    user: User,
    name: str,
    config: dict[str, Any] | None,
    description: str | None,
) -> DeploymentView:
    row = _require_own(session, user, name, "changed")
    previous_base = row.base_model
    if config is not None:
        # The SDK sends every field, unset ones as null: only the fields given change.
        changes = {key: value for key, value in config.items() if value is not None}
        # A deployment stored before engines were named keeps the engine its key says.
        stored = {"engine": engine_of(row.base_model)} | row.config
        cleaned = validate_config(settings, session, {**stored, **changes})
        key = serving_key(settings, session, user, cleaned)
        check_operator_replicas(settings, key, cleaned)
        row.config, row.base_model = cleaned, key
    if description is not None:
        row.description = description
    session.commit()
    view = DeploymentView.of(row)
    start(serving, session, user, view)
    if previous_base != row.base_model:
        _stop_if_unused(serving, session, previous_base)
    return view


def delete(serving: ServingSupervisor, session: Session, user: User, name: str) -> None:
    row = _require_own(session, user, name, "deleted")
    base_model = row.base_model
    session.delete(row)
    session.commit()
    _stop_if_unused(serving, session, base_model)


def status(serving: ServingSupervisor, view: DeploymentView) -> ServingStatus:
    return serving.status(view.base_model)


def events(serving: ServingSupervisor, view: DeploymentView) -> list[ServingEvent]:
    """What happened to the deployment's server since the deployment was made.

    A deployment made while its base model was already being served is ready (or failed) from
    the moment it was made, so that is what its timeline says.
    """
    since = [event for event in serving.events(view.base_model) if event.at >= view.created_at]
    current = serving.status(view.base_model)
    if not since and current in (ServingStatus.READY, ServingStatus.FAILED):
        kind = "Ready" if current is ServingStatus.READY else "Failed"
        since = [ServingEvent(kind=kind, at=view.created_at)]
    return since


def context_length(settings: Settings, session: Session, base_model: str) -> int:
    try:
        found = base_models.locate(settings, session, base_model)
    except BaseModelNameError:  # stored before the naming rules: shown, never served
        found = None
    return (found.context_length if found is not None else None) or DEFAULT_CONTEXT_LENGTH


def _context_model(row: Deployment) -> str:
    version_uuid = version_uuid_of(row.base_model)
    session = object_session(row)
    if version_uuid is None or session is None:
        return model_key_of(row.base_model)
    base = session.scalar(select(AdapterVersion.base_model).where(AdapterVersion.uuid == version_uuid))
    return base or model_key_of(row.base_model)


def _find(session: Session, user: User, name: str) -> Deployment | None:
    return session.scalar(
        select(Deployment).where(Deployment.tenant_id == user.tenant_id, Deployment.name == name)
    )


def _require_own(session: Session, user: User, name: str, verb: str) -> Deployment:
    row = _find(session, user, name)
    if row is not None:
        return row
    if name == DEFAULT_DEPLOYMENT:
        raise ConflictError(f"deployment {name!r} is the default deployment; it cannot be {verb}")
    raise NotFoundError(f"deployment {name!r} not found")


def _stop_if_unused(serving: ServingSupervisor, session: Session, base_model: str) -> None:
    """Every tenant's default deployment keeps the default base model in use."""
    if base_model == DEFAULT_BASE_MODEL:
        serving.resize(base_model, wanted_replicas(session, base_model))
        return
    count = session.scalar(
        select(func.count()).select_from(Deployment).where(Deployment.base_model == base_model)
    )
    if not count:
        serving.stop(base_model)
    else:
        serving.resize(base_model, wanted_replicas(session, base_model))


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone even though they were stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
