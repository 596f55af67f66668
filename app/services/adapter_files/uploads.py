"""Uploading an existing PEFT adapter as a new version: presigned staging, checks (`checks`), then
an atomic publish."""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CLASSIFIER_LABELS, PICKLED_WEIGHTS
from tuneforge.rules.classifier import MAX_LABELS_FILE_BYTES, ClassifierLabelsError, parse_labels

from app.context import AppContext
from app.db import AdapterVersion, Repo, User, VersionSource, VersionStatus
from app.errors import InvalidInputError, PayloadTooLargeError
from app.services import base_models, repos, upload_tokens
from app.services.adapter_files import checks as adapter_checks
from app.storage import BlobNotFoundError, BlobStore

log = logging.getLogger(__name__)

# The SDK insists on a URL for each of these, even for files it will not send.
# A classification adapter (PEFT task_type SEQ_CLS) also needs its label file.
UPLOAD_FILES = (ADAPTER_CONFIG, PICKLED_WEIGHTS, ADAPTER_WEIGHTS, CLASSIFIER_LABELS)
MAX_CONFIG_BYTES = 1024 * 1024


def begin(ctx: AppContext, session: Session, user: User, repo_name: str, base_url: str) -> dict[str, Any]:
    repo = repos.create(session, user, repo_name, description=None, exists_ok=True)
    staging = f"tenants/{user.tenant.uuid}/staging/adapters/{uuid.uuid4()}/"
    ttl = ctx.settings.signed_url_ttl_seconds
    urls = {
        name: ctx.store.presigned_put_url(f"{staging}{name}", expires_in=ttl, base_url=base_url)
        for name in UPLOAD_FILES
    }
    token = upload_tokens.issue(ctx, user, "adapter", repo=repo.uuid, staging=staging)
    return {"presignedUrls": urls, "uploadToken": token}


def finish(ctx: AppContext, session: Session, user: User, upload_token: str) -> AdapterVersion:
    claims = upload_tokens.verify(ctx, user, upload_token, "adapter")
    staging, store = claims["staging"], ctx.store
    repo = repos.get(session, user, claims["repo"])
    prefix = _version_prefix(user, repo, staging)
    # A client retrying after a lost response gets the version it already created.
    done = session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.repo_id == repo.id, AdapterVersion.artifact_prefix == prefix
        )
    )
    if done is not None:
        return done
    try:
        config = _read_config(store, staging, ctx.settings.max_lora_rank)
        files = {ADAPTER_CONFIG: _digest(store, f"{staging}{ADAPTER_CONFIG}")}
        files[ADAPTER_WEIGHTS] = _check_weights(ctx, session, staging, config)
        if config.get("task_type") == "SEQ_CLS":
            files[CLASSIFIER_LABELS] = _check_labels(store, staging)
        return _publish(ctx, session, user, repo, config, staging, prefix, files)
    finally:
        # The pickle file (if any) is never read; staging goes whether the upload was accepted or not.
        store.delete_prefix(staging)


def _version_prefix(user: User, repo: Repo, staging: str) -> str:
    """The published location shares the upload's id, which makes a repeated finish recognisable."""
    upload_id = staging.rstrip("/").rsplit("/", 1)[-1]
    return f"tenants/{user.tenant.uuid}/repos/{repo.uuid}/versions/{upload_id}/"


def _read_config(store: BlobStore, staging: str, max_rank: int) -> dict[str, Any]:
    try:
        size = store.stat(f"{staging}{ADAPTER_CONFIG}").size
    except BlobNotFoundError:
        raise InvalidInputError(f"{ADAPTER_CONFIG}: missing; upload what save_pretrained wrote") from None
    if size > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"{ADAPTER_CONFIG}: {size} bytes is too large for an adapter config")
    return adapter_checks.parse_config(store.read_bytes(f"{staging}{ADAPTER_CONFIG}"), max_rank=max_rank)


def _check_weights(ctx: AppContext, session: Session, staging: str, config: dict[str, Any]) -> dict[str, Any]:
    store, key = ctx.store, f"{staging}{ADAPTER_WEIGHTS}"
    if not store.exists(key):
        if store.exists(f"{staging}{PICKLED_WEIGHTS}"):
            raise InvalidInputError(
                f"{PICKLED_WEIGHTS} is a pickle file, which tuneforge never loads (unpickling can run "
                "arbitrary code). Convert it with `PeftModel.from_pretrained(...).save_pretrained(dir, "
                f"safe_serialization=True)` and upload {ADAPTER_WEIGHTS}"
            )
        raise InvalidInputError(
            f"{ADAPTER_WEIGHTS}: missing; upload the adapter weights in safetensors format"
        )
    size, max_bytes = store.stat(key).size, ctx.settings.max_upload_bytes
    if size > max_bytes:
        raise PayloadTooLargeError(f"{ADAPTER_WEIGHTS}: {size} bytes exceeds the limit of {max_bytes}")
    base_model = str(config["base_model_name_or_path"])
    model_config = base_models.model_config(ctx.settings, session, base_model)
    if model_config is None:
        log.info("upload of an adapter of %s: shapes not checked here (base model config unknown); "
                 "the serving process checks them at load", base_model)  # fmt: skip
    return adapter_checks.check_weights(
        store.iter_chunks(key), size, config, model_config=model_config, max_rank=ctx.settings.max_lora_rank
    )


def _check_labels(store: BlobStore, staging: str) -> dict[str, Any]:
    """A classifier's label file: present, and within the rules the serving engine loads it by."""
    key = f"{staging}{CLASSIFIER_LABELS}"
    if not store.exists(key):
        raise InvalidInputError(
            f"{CLASSIFIER_LABELS}: missing; a classification adapter (task_type SEQ_CLS) needs the label "
            "file tuneforge writes beside it"
        )
    if store.stat(key).size > MAX_LABELS_FILE_BYTES:
        raise InvalidInputError(f"{CLASSIFIER_LABELS}: larger than {MAX_LABELS_FILE_BYTES} bytes")
    try:
        parse_labels(store.read_bytes(key))
    except ClassifierLabelsError as exc:
        raise InvalidInputError(str(exc)) from None
    return _digest(store, key)


def _digest(store: BlobStore, key: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    for chunk in store.iter_chunks(key):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _publish(
    ctx: AppContext,
    session: Session,
    user: User,
    repo: Repo,
    config: dict[str, Any],
    staging: str,
    prefix: str,
    files: dict[str, dict[str, Any]],
) -> AdapterVersion:
    try:
        for name in files:
            ctx.store.copy(f"{staging}{name}", f"{prefix}{name}")
        version = AdapterVersion(
            repo_id=repo.id,
            created_by_id=user.id,
            tag=repos.allocate_tag(session, repo),
            status=VersionStatus.COMPLETED,
            source=VersionSource.UPLOAD,
            adapter_type=str(config.get("peft_type", "LORA")).lower(),
            base_model=str(config["base_model_name_or_path"]),
            config=config,
            artifact_prefix=prefix,
            artifact_files=files,
            metrics_summary={},
            archived=False,
        )
        session.add(version)
        session.commit()
    except BaseException:
        session.rollback()
        ctx.store.delete_prefix(prefix)  # no row points at these copies
        raise
    session.refresh(version)
    return version
