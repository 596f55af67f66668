"""Adapter versions `repo/N`: lookup, lineage (what a run continues from), archive, delete, zip download."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, object_session
from tuneforge.rules import base_models as base_model_rules
from tuneforge.rules.adapter_ref import AdapterRef
from tuneforge.rules.artifacts import ADAPTER_WEIGHTS

from app.context import AppContext
from app.db import AdapterVersion, JobCheckpoint, Repo, Tenant, User, VersionStatus
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.services import blob_keys, jobs, repos
from app.services.adapter_files.zip_stream import zip_chunks


def parse_tag(tag: str) -> int:
    if not tag.isdigit() or int(tag) < 1:
        raise InvalidInputError(f"tag: {tag!r} is not a version number; use a positive integer such as 1")
    return int(tag)


def get(session: Session, user: User, repo_ref: str, tag: str) -> AdapterVersion:
    """The version a route's `{repo}/{tag}` names; a missing repo is its own 404 (repos.get)."""
    repo = repos.get(session, user, repo_ref)
    return resolve(session, user.tenant.name, AdapterRef(repo.name, parse_tag(tag))).version


class VersionNotFoundError(NotFoundError):
    """No such version in the tenant (or no such repo): another tenant's is not revealed either."""


class CheckpointNotFoundError(NotFoundError):
    """The version exists, but its job stored no checkpoint at the step the reference names."""

    def __init__(self, version: AdapterVersion, step: int, available: list[int]) -> None:
        self.version, self.step, self.available = version, step, available
        self.uploaded = version.job is None  # an uploaded version has no job, so no checkpoints
        steps = ", ".join(str(s) for s in available) or "none"
        super().__init__(
            f"adapter version {version_id(version)} has no checkpoint at step {step}; "
            f"available steps: {steps}"
        )


@dataclass(frozen=True)
class ResolvedVersion:
    """What `repo/N[@step]` names: a version, and its job's checkpoint when a step is named."""

    version: AdapterVersion
    checkpoint: JobCheckpoint | None = None


def resolve(session: Session, tenant: str, ref: AdapterRef) -> ResolvedVersion:
    """The version `ref` names in tenant `tenant` (its repo by name or uuid), with the checkpoint at
    `ref.step` when it names one. Archived and unfinished versions resolve too: callers decide whether
    they can use them. Raises VersionNotFoundError or CheckpointNotFoundError.
    """
    version = session.scalar(
        select(AdapterVersion)
        .join(Repo, AdapterVersion.repo_id == Repo.id)
        .join(Tenant, Repo.tenant_id == Tenant.id)
        .where(
            Tenant.name == tenant,
            or_(Repo.name == ref.repo, Repo.uuid == ref.repo),
            AdapterVersion.tag == ref.number,
        )
    )
    if version is None:
        raise VersionNotFoundError(f"adapter version {ref.version} not found")
    if ref.step is None:
        return ResolvedVersion(version)
    checkpoint = jobs.checkpoint_at(session, version.job, ref.step) if version.job is not None else None
    if checkpoint is None:
        available = jobs.checkpoint_steps(session, version.job) if version.job is not None else []
        raise CheckpointNotFoundError(version, ref.step, available)
    return ResolvedVersion(version, checkpoint)


def servable_ids(session: Session, tenant: str, base_model: str) -> list[str]:
    """Completed, unarchived versions of `base_model` (under any of its names) in the tenant with
    safetensors LoRA weights, as `repo/N`, by repo name and number."""
    query = (
        select(AdapterVersion)
        .join(Repo, AdapterVersion.repo_id == Repo.id)
        .join(Tenant, Repo.tenant_id == Tenant.id)
        .where(
            Tenant.name == tenant,
            AdapterVersion.base_model.in_(sorted(base_model_rules.aliases(base_model))),
            AdapterVersion.status == VersionStatus.COMPLETED,
            AdapterVersion.archived.is_(False),
        )
        .order_by(Repo.name, AdapterVersion.tag)
    )
    found = session.scalars(query).unique()
    return [version_id(v) for v in found if ADAPTER_WEIGHTS in (v.artifact_files or {})]


def adapter_path(version: AdapterVersion) -> str | None:
    """What the SDK treats as 'artifact ready': the id servers load, once the files are stored."""
    if version.status == VersionStatus.COMPLETED and version.artifact_files:
        return f"{version.repo.name}/{version.tag}"
    return None


def set_archived(session: Session, version: AdapterVersion, archived: bool) -> AdapterVersion:
    version.archived = archived
    session.commit()
    return version


def delete(ctx: AppContext, session: Session, version: AdapterVersion) -> None:
    if version.status in repos.ACTIVE_STATUSES:
        raise ConflictError(
            f"adapter version {version.repo.name}/{version.tag} is still {version.status}; "
            "cancel its job first"
        )
    # A queued or training run still reads its parent's files (again on every restart).
    child = repos.active_child(session, [version.id])
    if child is not None:
        raise ConflictError(
            f"adapter version {version_id(version)} is the parent of {version_id(child)}, which is still "
            f"{child.status}; cancel that job first"
        )
    serving = repos.deployment_serving(session, [version.uuid])
    if serving is not None:
        raise ConflictError(
            f"adapter version {version_id(version)} is the model of deployment {serving!r}; delete that "
            "deployment first"
        )
    # Its artifact and its job's checkpoints; rows first, so a crash leaves orphans for `gc`.
    prefixes = blob_keys.version_prefixes(session, version)
    session.delete(version)
    session.commit()
    for prefix in prefixes:
        ctx.store.delete_prefix(prefix)


# A checkpoint directory holds the loadable model files at top level and the trainer's resumable
# state (optimizer, scheduler, RNG, progress) under this directory: only a resume of the same job
# needs the latter, so downloads and continued runs leave it out.
TRAINER_DIR = "trainer/"


class ParentMissingError(NotFoundError):
    """The version (or checkpoint) a run continues from is gone; the run cannot start from it."""


def model_files(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A checkpoint's files without the trainer state: what loads as a model or adapter."""
    return {name: meta for name, meta in files.items() if not name.startswith(TRAINER_DIR)}


def version_id(version: AdapterVersion) -> str:
    return f"{version.repo.name}/{version.tag}"


def parent_ref(version: AdapterVersion) -> str | None:
    """`repo/N` or `repo/N@step`: what the version continued from; None for a fresh start."""
    if version.parent is None:
        return None
    step = version.parent_checkpoint_step
    return version_id(version.parent) + (f"@{step}" if step is not None else "")


def parent_artifact(
    session: Session, version: AdapterVersion
) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """The storage prefix and files (name → {size, sha256}) a continued run initialises from.

    The parent's published artifact, or, for `repo/N@step`, that checkpoint of the parent's job
    without its trainer state. None for a version trained from scratch; `ParentMissingError` when
    the parent or its checkpoint has been deleted (or pruned) since the job was accepted.
    """
    step = version.parent_checkpoint_step
    parent = session.get(AdapterVersion, version.parent_version_id) if version.parent_version_id else None
    if parent is None:
        if step is None:
            return None
        raise ParentMissingError(
            f"adapter version {version_id(version)} continues from checkpoint step {step} of a version "
            "that has been deleted; start a new job without continueFromVersion or from another version"
        )
    if step is None:
        if parent.artifact_prefix is None or not parent.artifact_files:
            raise ParentMissingError(
                f"adapter version {version_id(version)} continues from {version_id(parent)}, "
                "whose files are no longer stored"
            )
        return parent.artifact_prefix, dict(parent.artifact_files)
    checkpoint = jobs.checkpoint_at(session, parent.job, step) if parent.job is not None else None
    if checkpoint is None:
        raise ParentMissingError(
            f"adapter version {version_id(version)} continues from checkpoint {version_id(parent)}@{step}, "
            "which no longer exists (older checkpoints are pruned as a job trains, keep_n_checkpoints)"
        )
    return checkpoint.prefix, model_files(checkpoint.files)


def last_checkpoint(version: AdapterVersion) -> JobCheckpoint | None:
    """The checkpoint a canceled or errored version serves as its artifact; None otherwise."""
    session = object_session(version)
    if version.status not in (VersionStatus.CANCELED, VersionStatus.ERRORED) or session is None:
        return None
    return jobs.latest_checkpoint(session, version.job) if version.job is not None else None


def last_checkpoint_step(version: AdapterVersion) -> int | None:
    checkpoint = last_checkpoint(version)
    return checkpoint.step if checkpoint is not None else None


def download_chunks(ctx: AppContext, version: AdapterVersion) -> Iterator[bytes]:
    """A zip of the artifact (or, for a job stopped short, of its last checkpoint's model files).

    A completed version serves every file the worker stored (weights, tokenizer, training
    summary); a checkpoint leaves out its trainer state. Each file is checked against the sha256
    recorded when it was stored.
    """
    checkpoint = last_checkpoint(version)
    if checkpoint is not None:
        prefix, files = checkpoint.prefix, model_files(checkpoint.files)
    elif adapter_path(version) is not None and version.artifact_prefix is not None:
        prefix, files = version.artifact_prefix, version.artifact_files
    else:
        raise ConflictError(
            f"adapter version {version.repo.name}/{version.tag} has no artifact to download "
            f"(status: {version.status})"
        )
    members = [
        (name, ctx.store.iter_chunks(f"{prefix}{name}", expected_sha256=meta.get("sha256")))
        for name, meta in sorted(files.items())
    ]
    return zip_chunks(members)
