"""Merged-model exports of adapter versions: ask for one, follow its state, download its files.

An export is a standard Hugging Face model directory (safetensors, config.json, generation_config.json,
tokenizer files) that loads with `AutoModelForCausalLM.from_pretrained` and needs no PEFT. A LoRA, DoRA
or Turbo LoRA version is merged into its base by the `tuneforge.export` task on a training worker, which
stores the directory under the version's own artifact directory (`.../versions/<id>/merged/`), so it
goes with the version and gc counts it as the version's. A full or last_layer version already is a whole
model: its export is its artifact, complete at once. States are `ExportStatus`; an export is asked for
once and kept; an errored one, or one pending past the train queue's time limit (its message was
lost), is started again when asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tuneforge.rules.artifacts import SPECULATOR_FILES, TRAINING_SUMMARY, ArtifactManifest
from tuneforge.rules.served_models import MERGEABLE_TYPES, SERVABLE_AS_MODEL_TYPES, WHOLE_MODEL_TYPES

from app.context import AppContext
from app.db import AdapterVersion, ExportStatus, VersionStatus
from app.db.base import utcnow
from app.errors import ConflictError, InvalidInputError, ServiceError
from app.queue import EnqueueError
from app.services.adapter_files.zip_stream import zip_chunks
from app.services.versions import version_id

log = logging.getLogger(__name__)

MERGED_DIR = "merged/"
# Beyond the train queue's soft time limit: its hard limit's grace (worker.celery_app), and a margin.
LOST_EXPORT_GRACE_SECONDS = 600
_NOT_MODEL_FILES = frozenset((TRAINING_SUMMARY, *SPECULATOR_FILES))


class ExportUnavailableError(ServiceError):
    """The broker did not take the export; it is recorded errored and may be asked for again."""

    status_code = 503


def check_servable_as_model(version: AdapterVersion) -> None:
    """422 unless the version can become a model of its own (exported, or deployed as `repo/N`)."""
    name = version_id(version)
    if version.status != VersionStatus.COMPLETED or not version.artifact_files or not version.artifact_prefix:
        raise ConflictError(
            f"adapter version {name} is {version.status}, not completed: it has no artifact to make a "
            "model of yet; wait until its job completes"
        )
    if version.adapter_type not in SERVABLE_AS_MODEL_TYPES:
        raise InvalidInputError(
            f"adapter version {name} is a {version.adapter_type!r} adapter (speculator heads only): there is "
            f"nothing to merge; serve it as an adapter of {version.base_model!r}. Versions of types "
            f"{', '.join(SERVABLE_AS_MODEL_TYPES)} can be made models"
        )
    manifest = ArtifactManifest.of_names(version.artifact_files)
    if version.adapter_type in MERGEABLE_TYPES and not manifest.has_lora:
        raise InvalidInputError(
            f"adapter version {name} has no safetensors PEFT adapter (adapter_config.json + "
            "adapter_model.safetensors) to merge"
        )
    if version.adapter_type in WHOLE_MODEL_TYPES and "config.json" not in manifest.names:
        raise InvalidInputError(f"adapter version {name} has no config.json: its stored model is incomplete")


def request(ctx: AppContext, session: Session, version: AdapterVersion) -> AdapterVersion:
    """Start the version's export unless one is under way or done; returns the version (its export state)."""
    check_servable_as_model(version)
    # Row-locked until the commit below: two requests at once start one export, not two.
    session.execute(select(AdapterVersion.id).where(AdapterVersion.id == version.id).with_for_update())
    session.refresh(version, ["export_status", "export_updated_at"])
    pending = version.export_status in (ExportStatus.QUEUED, ExportStatus.RUNNING)
    if version.export_status == ExportStatus.COMPLETED or (pending and not _lost(ctx, version)):
        return version
    version.export_error, version.export_updated_at = None, utcnow()
    if version.adapter_type in WHOLE_MODEL_TYPES:
        files = {k: v for k, v in version.artifact_files.items() if k not in _NOT_MODEL_FILES}
        version.export_status, version.export_prefix, version.export_files = (
            ExportStatus.COMPLETED,
            version.artifact_prefix,
            files,
        )
        session.commit()
        return version
    version.export_status, version.export_prefix, version.export_files = ExportStatus.QUEUED, None, {}
    session.commit()  # committed before the send: the worker re-reads the row
    try:
        ctx.queue.send_export(version.id)
    except EnqueueError as exc:
        log.warning("export of %s not sent: %s", version.uuid, exc)
        version.export_status, version.export_error = ExportStatus.ERRORED, "the job queue is unreachable"
        session.commit()
        raise ExportUnavailableError(
            f"adapter version {version_id(version)}: the job queue is unreachable, so the export was not "
            "started; ask for it again shortly"
        ) from None
    return version


def _lost(ctx: AppContext, version: AdapterVersion) -> bool:
    """A pending export older than the train queue's hard time limit can no longer be running: its
    message was lost (a broker restart), so asking again sends it again."""
    since = version.export_updated_at
    if since is None:
        return True
    since = since if since.tzinfo else since.replace(tzinfo=UTC)  # SQLite drops the zone
    limit = ctx.settings.job_time_limit_seconds + LOST_EXPORT_GRACE_SECONDS
    return (utcnow() - since).total_seconds() > limit


def record(version: AdapterVersion) -> dict[str, Any]:
    """The export's state as the API shows it."""
    return {
        "adapter": version_id(version),
        "status": version.export_status or "none",
        "error": version.export_error,
        "files": version.export_files if version.export_status == ExportStatus.COMPLETED else {},
        "updatedAt": version.export_updated_at.isoformat() if version.export_updated_at else None,
    }


def download_chunks(ctx: AppContext, version: AdapterVersion) -> Iterator[bytes]:
    """A zip of the completed export's files, each checked against the sha256 recorded when stored."""
    if version.export_status != ExportStatus.COMPLETED or version.export_prefix is None:
        state = version.export_status or "not asked for"
        raise ConflictError(
            f"adapter version {version_id(version)}: its export is {state}, not completed; ask for it with "
            "POST .../export and wait until its status is completed"
        )
    prefix = version.export_prefix
    members = [
        (name, ctx.store.iter_chunks(f"{prefix}{name}", expected_sha256=meta.get("sha256")))
        for name, meta in sorted(version.export_files.items())
    ]
    return zip_chunks(members)


# --- the worker's side (worker/export_task.py) ----------------------------------------------------


def claim(session: Session, version: AdapterVersion) -> bool:
    """Move a queued export to running, once: False when another delivery has it or it was settled."""
    result = session.execute(
        update(AdapterVersion)
        .where(
            AdapterVersion.id == version.id,
            AdapterVersion.export_status.in_((ExportStatus.QUEUED, ExportStatus.RUNNING)),
        )
        .values(export_status=ExportStatus.RUNNING, export_updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(version)
    return bool(getattr(result, "rowcount", 0))


def merged_prefix(version: AdapterVersion) -> str:
    if version.artifact_prefix is None:
        raise ConflictError(f"adapter version {version_id(version)} has no stored artifact")
    return f"{version.artifact_prefix}{MERGED_DIR}"


def finish(
    session: Session, version: AdapterVersion, files: dict[str, dict[str, Any]] | None, error: str | None
) -> None:
    """Record the stored export (`files`) or why it failed (`error`)."""
    version.export_updated_at = utcnow()
    if error is not None:
        version.export_status, version.export_error = ExportStatus.ERRORED, error
    else:
        version.export_status, version.export_prefix = ExportStatus.COMPLETED, merged_prefix(version)
        version.export_files, version.export_error = files or {}, None
    session.commit()
