"""The local blob store's presigned URLs: the control plane itself accepts the PUT and serves the GET."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.from_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import CtxDep
from app.errors import AuthenticationError, NotFoundError, PayloadTooLargeError
from app.signing import InvalidTokenError
from app.storage import BlobNotFoundError, BlobTooLargeError, LocalBlobStore

router = APIRouter(tags=["blobs"], include_in_schema=False)


def _key_for(ctx: CtxDep, token: str, method: str) -> tuple[str, str | None]:
    if not isinstance(ctx.store, LocalBlobStore):
        raise NotFoundError("this server's blobs live in S3; use the presigned S3 URL")
    try:
        return ctx.store.verify_url_token(token, method)
    except InvalidTokenError as exc:
        raise AuthenticationError(f"blob URL rejected ({exc}); ask the API for a fresh one") from None


def _sync_chunks(stream: AsyncIterator[bytes]) -> Iterator[bytes]:
    """Pull the request body from the event loop, one chunk at a time, inside a worker thread."""

    async def next_chunk() -> bytes:
        return await stream.__anext__()

    while True:
        try:
            chunk = anyio.from_thread.run(next_chunk)
        except StopAsyncIteration:
            return
        if chunk:
            yield chunk


@router.put("/blobs/{token}")
async def put_blob(token: str, request: Request, ctx: CtxDep) -> dict[str, Any]:
    key, _ = _key_for(ctx, token, "PUT")
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"upload is {declared} bytes; the limit is {limit} (TUNEFORGE_MAX_UPLOAD_BYTES)"
        )
    chunks = _sync_chunks(request.stream().__aiter__())
    try:
        info = await anyio.to_thread.run_sync(lambda: ctx.store.put_stream(key, chunks, max_bytes=limit))
    except BlobTooLargeError:
        raise PayloadTooLargeError(
            f"upload exceeds the limit of {limit} bytes (TUNEFORGE_MAX_UPLOAD_BYTES)"
        ) from None
    return {"size": info.size, "sha256": info.sha256}


@router.get("/blobs/{token}")
def get_blob(token: str, ctx: CtxDep) -> StreamingResponse:
    key, filename = _key_for(ctx, token, "GET")
    try:
        size = ctx.store.stat(key).size
    except BlobNotFoundError:
        raise NotFoundError("the file behind this link no longer exists") from None
    headers = {"Content-Length": str(size)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        ctx.store.iter_chunks(key), media_type="application/octet-stream", headers=headers
    )
