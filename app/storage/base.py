"""The blob-store interface every backend implements, and the checksum-carrying types it returns."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from app.signing import InvalidTokenError

# Reads and writes move in chunks of this size: a dataset or adapter is never whole in memory.
CHUNK_BYTES = 1024 * 1024


class StorageError(Exception):
    """A backend failure (unreachable, permission). Not a user error."""


class BlobNotFoundError(StorageError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no blob at {key!r}")
        self.key = key


class BlobTooLargeError(StorageError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"blob exceeds the limit of {limit} bytes")
        self.limit = limit


class ChecksumMismatchError(StorageError):
    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 of {key!r} is {actual}, expected {expected}: the stored object is corrupt")
        self.key, self.expected, self.actual = key, expected, actual


@dataclass(frozen=True)
class BlobGrant:
    """What a signed `/blobs/<token>` URL lets its holder do."""

    key: str
    method: str  # "PUT" or "GET"
    filename: str | None = None  # GET: the name the download is saved under
    sha256: str | None = None  # GET: what the bytes must hash to; a mismatch aborts the download
    closed_by: str | None = None  # PUT: refused once this key exists (the upload was registered)


def raw_chunks(source: Iterable[bytes] | BinaryIO) -> Iterator[bytes]:
    """Non-empty byte chunks from an iterable of chunks or a readable binary file."""
    read = getattr(source, "read", None)
    if read is None:
        yield from (bytes(chunk) for chunk in source if chunk)
        return
    while chunk := read(CHUNK_BYTES):
        yield chunk


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str | None  # None when the bytes arrived without passing through us (S3 presigned PUT)


@dataclass(frozen=True)
class StoredBlob:
    """One entry of a listing: what garbage collection needs to judge and report a blob."""

    key: str
    size: int
    modified: datetime  # timezone-aware UTC: when the bytes were last written


class BlobWriter(abc.ABC):
    """One blob written chunk by chunk: `commit` makes it visible with its sha256, `abort` leaves nothing.

    Chunks arrive as the caller gets them (the control plane writes an upload as its body streams
    in), so a slow client holds a writer, never a thread. Past `max_bytes`, `write` raises
    BlobTooLargeError; the caller then aborts.
    """

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self) -> BlobInfo: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Best effort and idempotent: called while another error is already on its way up."""


class BlobStore(abc.ABC):
    """Keys are '/'-separated relative paths chosen by the services, never by users."""

    @abc.abstractmethod
    def open_writer(
        self, key: str, *, content_type: str = "application/octet-stream", max_bytes: int | None = None
    ) -> BlobWriter:
        """Start writing `key`; nothing is visible under it until `commit`."""

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes] | BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> BlobInfo:
        """Stream bytes in, computing sha256 on the way; past `max_bytes` abort and leave nothing behind."""
        writer = self.open_writer(key, content_type=content_type, max_bytes=max_bytes)
        try:
            for chunk in raw_chunks(chunks):
                writer.write(chunk)
            return writer.commit()
        except BaseException:  # the source's own errors (a dropped client) must leave nothing too
            writer.abort()
            raise

    @abc.abstractmethod
    def iter_chunks(self, key: str, *, expected_sha256: str | None = None) -> Iterator[bytes]:
        """Stream bytes out; with `expected_sha256`, raise ChecksumMismatchError at the end on a mismatch."""

    @abc.abstractmethod
    def stat(self, key: str) -> BlobInfo:
        """Size (and the sha256 recorded at write time, if any); BlobNotFoundError when absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` ('a/b/' deletes 'a/b/x', not 'a/bc'); returns the count."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def list_blobs(self, prefix: str) -> Iterator[StoredBlob]:
        """Every blob under `prefix` with its size and write time, streamed (a store may hold millions)."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Server-side copy where the backend has one; keeps the recorded sha256."""

    @abc.abstractmethod
    def presigned_put_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        content_length: int | None = None,
        closed_by: str | None = None,
    ) -> str:
        """A URL an unauthenticated client may PUT raw bytes to until it expires.

        `base_url` is the control plane's public URL: URLs the control plane serves itself (the
        local store's, and relayed uploads) point there, take at most the upload limit, and are
        refused once the key `closed_by` exists (an upload that was registered). With
        `content_length`, a backend that signs it (S3) may hand out a direct URL that accepts a
        body of exactly that many bytes instead.
        """

    @abc.abstractmethod
    def presigned_get_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        filename: str | None = None,
        sha256: str | None = None,
    ) -> str:
        """A URL an unauthenticated client may GET the bytes from until it expires.

        With `sha256`, a URL the control plane serves aborts the download if the bytes differ.
        """

    def verify_url_token(self, token: str, method: str) -> BlobGrant:
        """The grant of a `/blobs/<token>` URL this store handed out; InvalidTokenError otherwise."""
        raise InvalidTokenError("this store hands out no control-plane blob URLs")

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the store is reachable and writable (readiness probe)."""

    def read_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        """For small objects only (configs, metadata)."""
        return b"".join(self.iter_chunks(key, expected_sha256=expected_sha256))
