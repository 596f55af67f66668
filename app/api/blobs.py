"""The control plane's own blob URLs: it accepts the PUT and serves the GET of a signed `/blobs/<token>`.

The local store serves every transfer here; the S3 store relays uploads of undeclared size here.
Transfers stream asynchronously (`blob_transfers`) and never hold a thread of the route pool.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.blob_transfers import BlobTransfers
from app.context import AppContext
from app.errors import AuthenticationError, ConflictError, NotFoundError, PayloadTooLargeError
from app.signing import InvalidTokenError
from app.storage import BlobGrant, BlobNotFoundError, BlobTooLargeError, content_disposition

router = APIRouter(tags=["blobs"], include_in_schema=False)


def _grant(request: Request, token: str, method: str) -> tuple[AppContext, BlobTransfers, BlobGrant]:
    # Read from app.state, not through a sync dependency: that would take a thread of the route pool.
    ctx: AppContext = request.app.state.ctx
    try:
        grant = ctx.store.verify_url_token(token, method)
    except InvalidTokenError as exc:
        raise AuthenticationError(f"blob URL rejected ({exc}); ask the API for a fresh one") from None
    return ctx, request.app.state.blob_transfers, grant


@router.put("/blobs/{token}")
async def put_blob(token: str, request: Request) -> dict[str, Any]:
    ctx, transfers, grant = _grant(request, token, "PUT")
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"upload is {declared} bytes; the limit is {limit}")
    if await transfers.closed(ctx.store, grant.closed_by):
        raise ConflictError("this upload was already registered; its URL is used up, begin a new upload")
    borrower = transfers.take_slot()
    try:
        info = await transfers.receive(ctx.store, grant.key, request.stream(), limit)
    except BlobTooLargeError:
        raise _too_large(f"upload exceeds the limit of {limit} bytes") from None
    finally:
        transfers.release_slot(borrower)
    return {"size": info.size, "sha256": info.sha256}


def _too_large(message: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{message} (TUNEFORGE_MAX_UPLOAD_BYTES)")


@router.get("/blobs/{token}")
async def get_blob(token: str, request: Request) -> Response:
    ctx, transfers, grant = _grant(request, token, "GET")
    borrower = transfers.take_slot()
    try:
        size, chunks = await transfers.open_download(ctx.store, grant.key, grant.sha256)
    except BaseException as exc:
        transfers.release_slot(borrower)
        if isinstance(exc, BlobNotFoundError):
            raise NotFoundError("the file behind this link no longer exists") from None
        raise
    headers = {"Content-Length": str(size)}
    if grant.filename:
        headers["Content-Disposition"] = content_disposition(grant.filename)
    return transfers.response(chunks, borrower, headers)
