"""Adapter versions `repo/N`: lookup, archive/unarchive, delete, and download as a zip of verified files."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from app.context import AppContext
from app.db import AdapterVersion, JobCheckpoint, User, VersionStatus
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.services import jobs, repos
from app.services.zip_stream import zip_chunks


def parse_tag(tag: str) -> int:
    if not tag.isdigit() or int(tag) < 1:
        raise InvalidInputError(f"tag: {tag!r} is not a version number; use a positive integer such as 1")
    return int(tag)


def get(session: Session, user: User, repo_ref: str, tag: str) -> AdapterVersion:
    repo = repos.get(session, user, repo_ref)
    number = parse_tag(tag)
    version = session.scalar(
        select(AdapterVersion).where(AdapterVersion.repo_id == repo.id, AdapterVersion.tag == number)
    )
    if version is None:
        raise NotFoundError(f"adapter version {repo.name}/{number} not found")
    return version


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
    prefix = version.artifact_prefix
    session.delete(version)
    session.commit()
    if prefix:
        ctx.store.delete_prefix(prefix)


# The files of a trained LoRA version in PEFT format: what the worker stores as the artifact, and
# what a checkpoint of a job stopped short serves as its download.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
    """A zip of the artifact (or, for a job stopped short, of its last checkpoint's adapter).

    Each file is checked against the sha256 recorded when it was stored.
    """
    checkpoint = last_checkpoint(version)
    if checkpoint is not None:
        prefix = checkpoint.prefix
        files = {name: checkpoint.files[name] for name in ADAPTER_FILES if name in checkpoint.files}
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
