"""Blob storage: the interface, its two backends, and the one place a storage URL becomes a store."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from app.settings import Settings
from app.signing import Signer
from app.storage.base import (
    CHUNK_BYTES,
    BlobGrant,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobTooLargeError,
    BlobWriter,
    ChecksumMismatchError,
    StorageError,
    StoredBlob,
)
from app.storage.local import LocalBlobStore
from app.storage.s3 import S3BlobStore
from app.storage.urls import content_disposition, verify_blob_token

__all__ = [
    "CHUNK_BYTES",
    "BlobGrant",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobStore",
    "BlobTooLargeError",
    "BlobWriter",
    "ChecksumMismatchError",
    "LocalBlobStore",
    "S3BlobStore",
    "StorageError",
    "StoredBlob",
    "content_disposition",
    "open_blob_store",
    "verify_blob_token",
]


def open_blob_store(settings: Settings) -> BlobStore:
    """`file:///abs/dir` → LocalBlobStore, `s3://bucket/optional/prefix` → S3BlobStore."""
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not Path(url.path).is_absolute():
            raise ValueError(f"storage_url: {settings.storage_url!r} must be file:///absolute/path")
        return LocalBlobStore(Path(url.path), Signer(settings.secret_key, "blob"))
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError(f"storage_url: {settings.storage_url!r} names no bucket; use s3://bucket/prefix")
        return S3BlobStore(
            url.netloc,
            url.path.strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            multipart_chunk_bytes=settings.multipart_chunk_bytes,
            public_endpoint_url=settings.s3_public_endpoint_url,
            url_signer=Signer(settings.secret_key, "blob"),
        )
    raise ValueError(
        f"storage_url: unsupported scheme {url.scheme!r}; use file:///path or s3://bucket/prefix"
    )
