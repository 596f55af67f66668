"""The `tuneforge.export` task: thin glue from a version id to a merged model directory in the blob store.

It runs on the train queue, beside training: merging loads the whole base model (and, for a large one,
as much memory as a training run's frozen base), which the validate node's children, capped at a few
hundred MB, cannot hold; and a train worker has the base models in its model cache already.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from celery import Celery

from app.context import AppContext
from app.db import AdapterVersion
from app.queue import EXPORT_TASK
from app.services import exports
from app.storage.base import StorageError
from worker.job_io import download_files, upload_dir
from worker.model_store import MODEL_ERRORS, resolve_model_dir
from worker.training.merge import MergeError, model_directory

log = logging.getLogger(__name__)

# Failures whose message tells the user what is wrong; anything else is recorded as internal and re-raised.
USER_ERRORS = (*MODEL_ERRORS, MergeError)


def register_export_task(celery: Celery, ctx: AppContext) -> None:
    @celery.task(name=EXPORT_TASK)
    def export_version(version_id: int) -> None:
        run_export(ctx, version_id)


def run_export(ctx: AppContext, version_id: int) -> None:
    """Merge version `version_id` into its base and store the result; safe to run again (redelivery)."""
    with ctx.sessions() as session:
        version = session.get(AdapterVersion, version_id)
        if version is None or not exports.claim(session, version):
            log.info("export of version %s: gone or already settled; dropping this delivery", version_id)
            return
        try:
            files = _merge_and_store(ctx, version)
        except USER_ERRORS as exc:
            exports.finish(session, version, None, str(exc))
            return
        except StorageError as exc:
            log.warning("export of version %s: storage failed: %s", version_id, exc)
            exports.finish(session, version, None, "reading or writing its files failed; ask for it again")
            return
        except Exception as exc:
            exports.finish(
                session, version, None, f"internal error ({type(exc).__name__}); see the worker log"
            )
            raise
        exports.finish(session, version, files, None)


def _merge_and_store(ctx: AppContext, version: AdapterVersion) -> dict[str, dict[str, object]]:
    assert version.artifact_prefix is not None  # claim() only hands out completed versions' exports
    base_dir = resolve_model_dir(ctx.settings, ctx.store, version.base_model)
    with tempfile.TemporaryDirectory(prefix=f"tuneforge-export-{version.uuid}-") as scratch:
        artifact = download_files(
            ctx.store, version.artifact_prefix, version.artifact_files, Path(scratch) / "a"
        )
        merged = model_directory(base_dir, artifact, Path(scratch) / "merged")
        prefix = exports.merged_prefix(version)
        ctx.store.delete_prefix(prefix)  # a redelivery's half-written files
        return upload_dir(ctx.store, merged, prefix)
