"""Adapter repositories: create (existsOk), look up by name or uuid, list, delete with their artifacts."""

from __future__ import annotations

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.rules.served_models import ENGINES, engine_key, version_model_key

from app.context import AppContext
from app.db import AdapterVersion, Deployment, Repo, User, VersionStatus
from app.errors import ConflictError, NotFoundError
from app.services import blob_keys
from app.services.names import validate_name

# Versions in these states have (or will have) a worker writing to them.
ACTIVE_STATUSES = (VersionStatus.QUEUED, VersionStatus.TRAINING, VersionStatus.STOPPING)


def create(session: Session, user: User, name: str, description: str | None, exists_ok: bool) -> Repo:
    validate_name(name, "name")
    existing = find(session, user, name)
    if existing is not None:
        if exists_ok:
            return existing
        raise ConflictError(f"name: repo {name!r} already exists; pass existsOk=true to reuse it")
    repo = Repo(
        tenant_id=user.tenant_id, created_by_id=user.id, name=name, description=description, last_tag=0
    )
    session.add(repo)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        if exists_ok and (existing := find(session, user, name)) is not None:
            return existing
        raise ConflictError(f"name: repo {name!r} already exists") from None
    return repo


def find(session: Session, user: User, ref: str) -> Repo | None:
    return session.scalar(
        select(Repo).where(Repo.tenant_id == user.tenant_id, or_(Repo.name == ref, Repo.uuid == ref))
    )


def get(session: Session, user: User, ref: str) -> Repo:
    repo = find(session, user, ref)
    if repo is None:
        raise NotFoundError(f"repo {ref!r} not found")
    return repo


def list_repos(session: Session, user: User, limit: int, offset: int) -> tuple[list[Repo], int]:
    owned = Repo.tenant_id == user.tenant_id
    total = session.scalar(select(func.count()).select_from(Repo).where(owned)) or 0
    query = select(Repo).where(owned).order_by(Repo.created_at.desc(), Repo.id.desc())
    return list(session.scalars(query.limit(limit).offset(offset)).unique()), total


def allocate_tag(session: Session, repo: Repo) -> int:
    """The next version number, atomically: concurrent allocations never share a tag."""
    tag = session.execute(
        update(Repo).where(Repo.id == repo.id).values(last_tag=Repo.last_tag + 1).returning(Repo.last_tag)
    ).scalar_one()
    return int(tag)


def active_child(session: Session, parent_ids: list[int]) -> AdapterVersion | None:
    """A queued or training version continuing from one of `parent_ids`: it still reads their files."""
    if not parent_ids:
        return None
    return session.scalars(
        select(AdapterVersion).where(
            AdapterVersion.parent_version_id.in_(parent_ids), AdapterVersion.status.in_(ACTIVE_STATUSES)
        )
    ).first()


def delete(ctx: AppContext, session: Session, repo: Repo) -> None:
    active = [v.tag for v in repo.versions if v.status in ACTIVE_STATUSES]
    if active:
        raise ConflictError(
            f"repo {repo.name!r} has versions still training ({', '.join(map(str, active))}); "
            "cancel their jobs first"
        )
    child = active_child(session, [v.id for v in repo.versions])
    if child is not None:
        raise ConflictError(
            f"repo {repo.name!r} holds the parent of {child.repo.name}/{child.tag}, which is still "
            f"{child.status}; cancel that job first"
        )
    serving = deployment_serving(session, [v.uuid for v in repo.versions])
    if serving is not None:
        raise ConflictError(
            f"repo {repo.name!r} holds the model of deployment {serving!r}; delete that first"
        )
    # Every version's artifact and its jobs' checkpoints; rows first, so a crash leaves orphans for `gc`.
    prefixes = blob_keys.repo_prefixes(session, repo)
    session.delete(repo)
    session.commit()
    for prefix in prefixes:
        ctx.store.delete_prefix(prefix)


def deployment_serving(session: Session, version_uuids: list[str]) -> str | None:
    """The name of a deployment (of any of the tenant's) whose model is one of these versions, if any."""
    if not version_uuids:
        return None
    keys = [engine_key(version_model_key(uuid), engine) for uuid in version_uuids for engine in ENGINES]
    return session.scalar(select(Deployment.name).where(Deployment.base_model.in_(keys)).limit(1))
