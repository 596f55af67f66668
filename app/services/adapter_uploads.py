"""Uploading an existing PEFT adapter as a new version: presigned staging, checks, then an atomic publish."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import AdapterVersion, Repo, User, VersionSource, VersionStatus
from app.errors import InvalidInputError, PayloadTooLargeError
from app.services import repos, upload_tokens
from app.storage import BlobNotFoundError, BlobStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# The SDK insists on a URL for each of these, even for files it will not send.
UPLOAD_FILES = (CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE)
MAX_CONFIG_BYTES = 1024 * 1024
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
                       "U64", "F8_E4M3", "F8_E5M2"}  # fmt: skip


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
        config = _read_config(store, staging)
        files = {CONFIG_FILE: _digest(store, f"{staging}{CONFIG_FILE}")}
        files[WEIGHTS_FILE] = _check_weights(store, staging, ctx.settings.max_upload_bytes)
        return _publish(ctx, session, user, repo, config, staging, prefix, files)
    finally:
        # The pickle file (if any) is never read; staging goes whether the upload was accepted or not.
        store.delete_prefix(staging)


def _version_prefix(user: User, repo: Repo, staging: str) -> str:
    """The published location shares the upload's id, which makes a repeated finish recognisable."""
    upload_id = staging.rstrip("/").rsplit("/", 1)[-1]
    return f"tenants/{user.tenant.uuid}/repos/{repo.uuid}/versions/{upload_id}/"


def _read_config(store: BlobStore, staging: str) -> dict[str, Any]:
    try:
        size = store.stat(f"{staging}{CONFIG_FILE}").size
    except BlobNotFoundError:
        raise InvalidInputError(f"{CONFIG_FILE}: missing; upload what save_pretrained wrote") from None
    if size > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"{CONFIG_FILE}: {size} bytes is too large for an adapter config")
    try:
        config = json.loads(store.read_bytes(f"{staging}{CONFIG_FILE}"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{CONFIG_FILE}: must be a JSON object")
    if not config.get("peft_type"):
        raise InvalidInputError(f"{CONFIG_FILE}: peft_type is missing; is this a PEFT adapter config?")
    if not config.get("base_model_name_or_path"):
        raise InvalidInputError(
            f"{CONFIG_FILE}: base_model_name_or_path is missing; set it to the base model the adapter was "
            "trained on"
        )
    return config


def _check_weights(store: BlobStore, staging: str, max_bytes: int) -> dict[str, Any]:
    key = f"{staging}{WEIGHTS_FILE}"
    if not store.exists(key):
        if store.exists(f"{staging}{PICKLE_FILE}"):
            raise InvalidInputError(
                f"{PICKLE_FILE} is a pickle file, which tuneforge never loads (unpickling can run arbitrary "
                "code). Convert it with `PeftModel.from_pretrained(...).save_pretrained(dir, "
                f"safe_serialization=True)` and upload {WEIGHTS_FILE}"
            )
        raise InvalidInputError(f"{WEIGHTS_FILE}: missing; upload the adapter weights in safetensors format")
    size = store.stat(key).size
    if size > max_bytes:
        raise PayloadTooLargeError(f"{WEIGHTS_FILE}: {size} bytes exceeds the limit of {max_bytes}")
    digest, head, need = hashlib.sha256(), bytearray(), 8
    for chunk in store.iter_chunks(key):
        digest.update(chunk)
        rest = memoryview(chunk)
        while len(head) < need and rest:
            take = need - len(head)
            head += rest[:take]
            rest = rest[take:]
            if need == 8 and len(head) == 8:  # the length prefix tells how much header follows
                need += _header_length(head, size)
    if need == 8 or len(head) < need:
        raise InvalidInputError(f"{WEIGHTS_FILE}: truncated file ({size} bytes)")
    header_len = need - 8
    _check_tensor_table(bytes(head[8:]), data_bytes=size - 8 - header_len)
    return {"size": size, "sha256": digest.hexdigest()}


def _header_length(prefix: bytearray, size: int) -> int:
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length == 0 or length > _SAFETENSORS_MAX_HEADER or length + 8 > size:
        raise InvalidInputError(f"{WEIGHTS_FILE}: not a safetensors file (bad header length {length})")
    return int(length)


def _check_tensor_table(raw: bytes, data_bytes: int) -> None:
    """The header must describe tensors that exactly tile the data section, as safetensors requires."""
    try:
        table = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{WEIGHTS_FILE}: not a safetensors file (header is not JSON)") from None
    tensors = {k: v for k, v in table.items() if k != "__metadata__"} if isinstance(table, dict) else {}
    if not tensors:
        raise InvalidInputError(f"{WEIGHTS_FILE}: contains no tensors")
    end = 0
    for name, spec in tensors.items():
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or spec.get("dtype") not in _SAFETENSORS_DTYPES or not offsets:
            raise InvalidInputError(f"{WEIGHTS_FILE}: tensor {name!r} has an invalid dtype or offsets")
        end = max(end, int(offsets[1]))
    if end != data_bytes:
        raise InvalidInputError(
            f"{WEIGHTS_FILE}: header describes {end} bytes of tensor data but the file has {data_bytes}"
        )


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
