"""Streams bytes between a client and the blob store without holding a thread for the transfer's length.

A transfer holds one of `blob_transfer_limit` slots, an open writer or reader, and a buffer of at
most CHUNK_BYTES; the body is read and the response sent on the event loop. Each disk or S3 call
runs as a short hop on a small thread limiter of its own, so even thousands of slow clients never
take a thread from the pool that serves authentication and ordinary routes. A client that sends
or takes nothing for `blob_idle_timeout_seconds` is dropped; past the limit, 503 + Retry-After.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app.errors import InvalidInputError, ServiceUnavailableError
from app.storage import CHUNK_BYTES, BlobInfo, BlobStore, ChecksumMismatchError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Disk and S3 calls of all transfers together: each is short (one chunk, one part), so a few
# threads keep up with many transfers.
_IO_THREADS = 8
# Transfers take seconds to minutes; a client told to come back soon spreads the load.
RETRY_AFTER_SECONDS = 5


class TransferRequestError(InvalidInputError):
    status_code = 400


class BlobTransfers:
    """One per API process: the transfer slots and the I/O thread limiter, built by the app factory."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self._slots = anyio.CapacityLimiter(limit)
        self._io_limiter = anyio.CapacityLimiter(_IO_THREADS)
        self._idle_timeout = idle_timeout

    def take_slot(self) -> object:
        """A slot for one transfer (release with `release_slot`), or 503 when all are taken."""
        borrower = object()
        try:
            self._slots.acquire_on_behalf_of_nowait(borrower)
        except anyio.WouldBlock:
            raise ServiceUnavailableError(
                f"the server is streaming {int(self._slots.total_tokens)} uploads and downloads already "
                "(TUNEFORGE_BLOB_TRANSFER_LIMIT); retry shortly",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None
        return borrower

    def release_slot(self, borrower: object) -> None:
        self._slots.release_on_behalf_of(borrower)

    async def closed(self, store: BlobStore, key: str | None) -> bool:
        return key is not None and await self._io(store.exists, key)

    async def receive(
        self, store: BlobStore, key: str, body: AsyncIterator[bytes], max_bytes: int
    ) -> BlobInfo:
        """Write the request body to `key`, a buffer at a time; nothing is left behind on any failure."""
        writer = await self._io(store.open_writer, key, max_bytes=max_bytes)
        try:
            buffer = bytearray()
            async for chunk in self._idle_bounded(body):
                buffer += chunk
                if len(buffer) >= CHUNK_BYTES:
                    await self._io(writer.write, bytes(buffer))
                    buffer = bytearray()
            if buffer:
                await self._io(writer.write, bytes(buffer))
            return await self._io(writer.commit)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._io(writer.abort)
            raise

    async def open_download(
        self, store: BlobStore, key: str, expected_sha256: str | None
    ) -> tuple[int, AsyncIterator[bytes]]:
        """The blob's size and chunks; opened now, so a missing blob fails before the response starts."""
        size = (await self._io(store.stat, key)).size
        chunks = await self._io(store.iter_chunks, key, expected_sha256=expected_sha256)
        return size, self._held_back(key, chunks)

    def response(
        self, chunks: AsyncIterator[bytes], borrower: object, headers: dict[str, str]
    ) -> StreamingResponse:
        """Streams `chunks`; the slot of `borrower` is released when the response ends."""
        return _TransferResponse(self, chunks, borrower, headers)

    async def _held_back(self, key: str, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
        """Each chunk is sent once the next is read: the last one only after the sha256 check passed,
        so a download of bytes that changed since registration ends short instead of complete."""
        held: bytes | None = None
        while True:
            try:
                chunk = await self._io(next, chunks, None)
            except ChecksumMismatchError:
                log.error("download of %s aborted: its bytes no longer match the recorded sha256", key)
                raise
            if chunk is None:
                break
            if held is not None:
                yield held
            held = chunk
        if held is not None:
            yield held

    async def _idle_bounded(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        iterator = body.__aiter__()
        while True:
            try:
                with anyio.fail_after(self._idle_timeout):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise TransferRequestError(
                    f"the upload stalled: no bytes arrived for {self._idle_timeout:g} s "
                    "(TUNEFORGE_BLOB_IDLE_TIMEOUT_SECONDS); start the PUT again"
                ) from None
            except ClientDisconnect:
                raise TransferRequestError("the client went away before the upload finished") from None
            if chunk:
                yield chunk

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._io_limiter
        )

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout


class _TransferResponse(StreamingResponse):
    """Holds its transfer slot until the last byte is sent, and drops a client that stops reading."""

    def __init__(
        self,
        transfers: BlobTransfers,
        chunks: AsyncIterator[bytes],
        borrower: object,
        headers: dict[str, str],
    ) -> None:
        super().__init__(chunks, media_type="application/octet-stream", headers=headers)
        self._transfers, self._borrower = transfers, borrower

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._transfers.release_slot(self._borrower)

    async def stream_response(self, send: Send) -> None:
        timeout = self._transfers.idle_timeout

        async def bounded_send(message: Message) -> None:
            with anyio.fail_after(timeout):
                await send(message)

        try:
            await super().stream_response(bounded_send)
        except TimeoutError:
            log.info("dropped a download whose client read nothing for %g s", timeout)
