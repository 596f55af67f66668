"""The blob-store interface every backend implements, and the checksum-carrying types it returns."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

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


class BlobStore(abc.ABC):
    """Keys are '/'-separated relative paths chosen by the services, never by users."""

    @abc.abstractmethod
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes] | BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> BlobInfo:
        """Stream bytes in, computing sha256 on the way; past `max_bytes` abort and leave nothing behind."""

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
    def presigned_put_url(self, key: str, *, expires_in: int, base_url: str) -> str:
        """A URL an unauthenticated client may PUT raw bytes to until it expires.

        `base_url` is the control plane's public URL: the local backend points its URLs there.
        """

    @abc.abstractmethod
    def presigned_get_url(
        self, key: str, *, expires_in: int, base_url: str, filename: str | None = None
    ) -> str:
        """A URL an unauthenticated client may GET the bytes from until it expires."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the store is reachable and writable (readiness probe)."""

    def read_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        """For small objects only (configs, metadata)."""
        return b"".join(self.iter_chunks(key, expected_sha256=expected_sha256))
