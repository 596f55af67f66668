"""Byte-stream helpers both blob backends share: key validation, metered writes, verified reads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from app.storage.base import BlobTooLargeError, ChecksumMismatchError

# Names starting with this are ours (sidecar tree, temp files): keys may not use it, listings skip it.
RESERVED_PREFIX = ".tf-"


def validate_key(key: str, *, allow_prefix: bool = False) -> str:
    """Refuse anything that could name a path outside the store or collide with its bookkeeping.

    With `allow_prefix`, the empty string and a trailing '/' are accepted (list/delete prefixes).
    """
    body = key.removesuffix("/") if allow_prefix else key
    if allow_prefix and not body:
        return key
    if not body or body.startswith("/") or "\\" in body or "\x00" in body:
        raise ValueError(f"invalid blob key {key!r}: must be a relative '/'-separated path")
    for segment in body.split("/"):
        if segment in ("", ".", "..") or segment.startswith(RESERVED_PREFIX):
            raise ValueError(f"invalid blob key {key!r}: bad segment {segment!r}")
    return key


class ByteMeter:
    """Hashes and counts bytes as they pass, refusing the chunk that takes the total past `max_bytes`."""

    def __init__(self, max_bytes: int | None) -> None:
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._max_bytes is not None and self.size + len(chunk) > self._max_bytes:
            raise BlobTooLargeError(self._max_bytes)
        self.size += len(chunk)
        self._hash.update(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def verified_chunks(chunks: Iterable[bytes], key: str, expected_sha256: str | None) -> Iterator[bytes]:
    """Pass chunks through; the check can only run after the last byte, so the caller gets an error then."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise ChecksumMismatchError(key, expected_sha256, digest.hexdigest())
