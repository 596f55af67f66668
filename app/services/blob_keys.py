"""Where a tenant's data lies in the blob store and which row owns each key: what deletes and gc rely on.

    tenants/<tenant>/uploads/<upload>/<file>              a dataset upload as the client PUT it, and
                                                          the marker that closes it once registered
    tenants/<tenant>/datasets/<upload>/<file>             a dataset's file (`Dataset.blob_key`)
    tenants/<tenant>/datasets/<upload>/tokenized/<key>    its tokenised caches (written by workers)
    tenants/<tenant>/staging/adapters/<upload>/<file>     an adapter upload awaiting its checks
    tenants/<tenant>/repos/<repo>/versions/<id>/<file>    a version's artifact (`artifact_prefix`)
    tenants/<tenant>/jobs/<job>/checkpoints/step-N/...    a job's checkpoints (`JobCheckpoint.prefix`)
    tenants/<tenant>/tokenized/<key>                      tokenised caches of an earlier layout

Everything of one dataset, version, checkpoint or job lies under one directory of its own, so a
delete removes that directory and `gc` can tell an owner's blobs by their key alone. Keys outside
this layout are never deleted by a prefix derived from them.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import AdapterVersion, FinetuningJob, Repo, Tenant

TENANTS = "tenants/"
# Written beside an upload when it is registered: the token and the control plane's PUT URL are then
# used up, even once the dataset is deleted (the marker outlives both; `tuneforge gc` removes it only
# once no upload token can still name it).
UPLOAD_REGISTERED_MARKER = "registered"


def dataset_dir(blob_key: str) -> str | None:
    """`tenants/<t>/datasets/<upload>/` for a dataset's file; None for a key outside the layout."""
    parts = blob_key.split("/")
    if len(parts) == 5 and parts[0] == "tenants" and parts[2] == "datasets" and all(parts):
        return "/".join(parts[:4]) + "/"
    return None


def tokenized_prefix(blob_key: str) -> str | None:
    """Where the tokenised caches of the dataset stored at `blob_key` go; None: do not cache them."""
    directory = dataset_dir(blob_key)
    return f"{directory}tokenized/" if directory is not None else None


def job_dir(tenant_uuid: str, job_uuid: str) -> str:
    return f"{TENANTS}{tenant_uuid}/jobs/{job_uuid}/"


def repo_dir(tenant_uuid: str, repo_uuid: str) -> str:
    return f"{TENANTS}{tenant_uuid}/repos/{repo_uuid}/"


def is_registered_upload(prefix: str, keys: list[str]) -> bool:
    """A dataset upload's directory (no row ever points at one: registration copies the bytes out)
    holding the marker that keeps its token used up."""
    parts = prefix.rstrip("/").split("/")
    is_upload = len(parts) == 4 and _matches(parts, ("tenants", "*", "uploads", "*"))
    return is_upload and f"{prefix}{UPLOAD_REGISTERED_MARKER}" in keys


def owner_prefix(key: str) -> str | None:
    """The directory of the dataset, staged upload, version or checkpoint `key` belongs to.

    An old-layout cache entry is its own owner. None for a key this layout does not describe:
    garbage collection leaves such keys alone.
    """
    parts = key.split("/")
    if _matches(parts, _OLD_TOKEN_CACHE) and len(parts) == len(_OLD_TOKEN_CACHE):
        return key
    for pattern in _OWNERS:
        if len(parts) > len(pattern) and _matches(parts, pattern):
            return "/".join(parts[: len(pattern)]) + "/"
    return None


# Owner directories as segment patterns ("*" is any one segment): the layout table above.
_OWNERS = (
    ("tenants", "*", "uploads", "*"),
    ("tenants", "*", "datasets", "*"),
    ("tenants", "*", "staging", "adapters", "*"),
    ("tenants", "*", "repos", "*", "versions", "*"),
    ("tenants", "*", "jobs", "*", "checkpoints", "*"),
)
_OLD_TOKEN_CACHE = ("tenants", "*", "tokenized", "*")


def _matches(parts: list[str], pattern: tuple[str, ...]) -> bool:
    if len(parts) < len(pattern) or not all(parts):
        return False
    return all(want in ("*", part) for part, want in zip(parts, pattern, strict=False))


def version_prefixes(session: Session, version: AdapterVersion) -> list[str]:
    """Every prefix holding the version's bytes: its artifact and its job's checkpoints."""
    prefixes = [version.artifact_prefix] if version.artifact_prefix else []
    job = session.scalar(select(FinetuningJob).where(FinetuningJob.version_id == version.id))
    if job is not None:
        prefixes.append(job_dir(_tenant_uuid(session, job.tenant_id), job.uuid))
    return prefixes


def repo_prefixes(session: Session, repo: Repo) -> list[str]:
    """The repo's directory (every version's artifact) and each of its jobs' directories."""
    tenant_uuid = _tenant_uuid(session, repo.tenant_id)
    directory = repo_dir(tenant_uuid, repo.uuid)
    elsewhere = [
        v.artifact_prefix
        for v in repo.versions
        if v.artifact_prefix and not v.artifact_prefix.startswith(directory)
    ]
    job_uuids = session.scalars(select(FinetuningJob.uuid).where(FinetuningJob.repo_id == repo.id))
    return [directory, *elsewhere, *(job_dir(tenant_uuid, uuid) for uuid in job_uuids)]


def _tenant_uuid(session: Session, tenant_id: int) -> str:
    return session.scalars(select(Tenant.uuid).where(Tenant.id == tenant_id)).one()
