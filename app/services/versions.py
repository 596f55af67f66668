"""Adapter versions `repo/N`: lookup, archive/unarchive, delete, and download as a zip of verified files."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import AdapterVersion, User, VersionStatus
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.services import repos
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


def download_chunks(ctx: AppContext, version: AdapterVersion) -> Iterator[bytes]:
    """A zip of the artifact; each file is checked against the sha256 recorded when it was stored."""
    if adapter_path(version) is None or version.artifact_prefix is None:
        raise ConflictError(
            f"adapter version {version.repo.name}/{version.tag} has no artifact to download "
            f"(status: {version.status})"
        )
    prefix = version.artifact_prefix
    members = [
        (name, ctx.store.iter_chunks(f"{prefix}{name}", expected_sha256=meta.get("sha256")))
        for name, meta in sorted(version.artifact_files.items())
    ]
    return zip_chunks(members)
