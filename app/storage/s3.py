"""The S3 / MinIO blob store (production), speaking to the bucket through boto3 only."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.signing import Signer
from app.storage.base import (
    CHUNK_BYTES,
    BlobGrant,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    StorageError,
    StoredBlob,
)
from app.storage.streams import ByteMeter, validate_key, verified_chunks
from app.storage.urls import BlobUrls, content_disposition

# S3's own limits: parts (but the last) are at least 5 MiB; one CopyObject moves at most 5 GiB.
MIN_PART_BYTES = 5 * 1024**2
MAX_SINGLE_COPY_BYTES = 5 * 1024**3
# 1 GiB copy parts keep any object S3 allows (5 TiB) under its 10,000-part limit.
_COPY_PART_BYTES = 1024**3
_CONNECT_TIMEOUT_S = 10
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Map boto's exceptions onto the storage ones, so callers never import botocore."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise BlobNotFoundError(key) from exc
        raise StorageError(
            f"S3 refused {exc.operation_name} on {key!r}: {code} {error.get('Message', '')}"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 unreachable for {key!r}: {exc}") from exc


class S3BlobStore(BlobStore):
    """Keys live under `prefix` in `bucket`; credentials come from boto3's standard chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_chunk_bytes: int = 16 * 1024**2,
        public_endpoint_url: str | None = None,
        url_signer: Signer | None = None,
    ) -> None:
        if multipart_chunk_bytes < MIN_PART_BYTES:
            raise ValueError(
                f"multipart_chunk_bytes must be at least {MIN_PART_BYTES} (S3's minimum part size)"
            )
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.part_bytes = multipart_chunk_bytes
        # Uploads of undeclared size are relayed through the control plane's own URLs (see
        # presigned_put_url); without a signer only size-declared direct uploads are possible.
        self._urls = BlobUrls(url_signer) if url_signer is not None else None
        # Custom endpoints (MinIO, moto) rarely resolve bucket subdomains: address buckets by path there.
        addressing = "path" if endpoint_url else "auto"
        config = Config(
            signature_version="s3v4",
            retries={"mode": "standard"},
            s3={"addressing_style": addressing},
            connect_timeout=_CONNECT_TIMEOUT_S,  # a dead endpoint must fail the readiness probe fast
        )
        self._client: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Presigned URLs are used by clients, which may reach S3 under another name than we do
        # (compose: `minio:9000` inside, `localhost:9000` outside). Signing needs no network.
        self._signer: Any = self._client
        if public_endpoint_url and public_endpoint_url != endpoint_url:
            self._signer = boto3.client(
                "s3", endpoint_url=public_endpoint_url, region_name=region, config=config
            )

    def open_writer(
        self, key: str, *, content_type: str = "application/octet-stream", max_bytes: int | None = None
    ) -> BlobWriter:
        return _S3Writer(self, key, content_type, max_bytes)

    def iter_chunks(self, key: str, *, expected_sha256: str | None = None) -> Iterator[bytes]:
        with _s3_errors(key):  # fetched here so a missing key fails at the call, before a response starts
            body = self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        return verified_chunks(_body_chunks(body, key), key, expected_sha256)

    def stat(self, key: str) -> BlobInfo:
        head = self._head(key)
        sha256 = head.get("Metadata", {}).get("sha256") or _full_object_sha256(head.get("ChecksumSHA256"))
        return BlobInfo(key=key, size=int(head["ContentLength"]), sha256=sha256)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except BlobNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        with _s3_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for page in self._pages(prefix):
            # One listing page is at most 1000 keys, exactly DeleteObjects' batch limit.
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not objects:
                continue
            with _s3_errors(prefix):
                result = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            if result.get("Errors"):
                first = result["Errors"][0]
                raise StorageError(f"S3 could not delete {first.get('Key')!r}: {first.get('Code')}")
            deleted += len(objects)
        return deleted

    def list_keys(self, prefix: str) -> list[str]:
        return [
            item["Key"][len(self.prefix) :]
            for page in self._pages(prefix)
            for item in page.get("Contents", [])
        ]

    def list_blobs(self, prefix: str) -> Iterator[StoredBlob]:
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                modified = item["LastModified"]
                yield StoredBlob(
                    key=item["Key"][len(self.prefix) :],
                    size=int(item["Size"]),
                    modified=modified if modified.tzinfo else modified.replace(tzinfo=UTC),
                )

    def copy(self, src: str, dst: str) -> None:
        head = self._head(src)
        self._copy_within(self._full(src), self._full(dst), int(head["ContentLength"]))

    def verify_url_token(self, token: str, method: str) -> BlobGrant:
        if self._urls is None:
            return super().verify_url_token(token, method)
        return self._urls.verify(token, method)

    def presigned_put_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        content_length: int | None = None,
        closed_by: str | None = None,
    ) -> str:
        """A direct S3 URL bound to `content_length`, else a URL of the control plane that relays to S3.

        A presigned PUT accepts any body up to S3's 5 GiB; signing Content-Length makes S3 (and
        MinIO) refuse a body of any other length, so the declared size, checked against the limit
        by the caller, is what S3 takes. Without a declared size the bytes pass through the
        control plane, which enforces the limit while they stream. A direct URL cannot be closed
        by `closed_by`: a late PUT lands on `key` only, never on what was registered from it.
        """
        if content_length is None:
            if self._urls is None:
                raise StorageError("this S3 store has no URL signer to relay uploads of undeclared size")
            grant = BlobGrant(key, "PUT", closed_by=closed_by)
            return self._urls.url(base_url, grant, expires_in=expires_in)
        params = {"Bucket": self.bucket, "Key": self._full(key), "ContentLength": content_length}
        with _s3_errors(key):
            url: str = self._signer.generate_presigned_url("put_object", Params=params, ExpiresIn=expires_in)
        return url

    def presigned_get_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        filename: str | None = None,
        sha256: str | None = None,
    ) -> str:
        # S3 serves the bytes itself: the caller compares `sha256` with stat() before asking for a URL.
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        with _s3_errors(key):
            url: str = self._signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)
        return url

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            # head_bucket's 404 means a missing bucket: a misconfiguration, not a missing blob.
            raise StorageError(f"S3 bucket {self.bucket!r} is not reachable: {exc}") from exc

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _head(self, key: str) -> dict[str, Any]:
        with _s3_errors(key):
            head: dict[str, Any] = self._client.head_object(
                Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED"
            )
        return head

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        full_prefix = self.prefix + validate_key(prefix, allow_prefix=True)
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3_errors(prefix):
            yield from paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)

    def start_multipart(self, key: str, content_type: str) -> _MultipartUpload:
        return _MultipartUpload(self._client, self.bucket, self._full(key), content_type)

    def set_metadata(self, key: str, size: int, sha256: str, content_type: str) -> None:
        replace = {"Metadata": {"sha256": sha256}, "ContentType": content_type}
        self._copy_within(self._full(key), self._full(key), size, replace)

    def put_small(self, key: str, data: bytearray, content_type: str, sha256: str) -> None:
        with _s3_errors(key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._full(key),
                Body=data,
                ContentType=content_type,
                Metadata={"sha256": sha256},
            )

    def _copy_within(self, src: str, dst: str, size: int, replace: dict[str, Any] | None = None) -> None:
        """Server-side copy keeping the source's metadata, or replacing it with `replace`'s."""
        if size > MAX_SINGLE_COPY_BYTES:
            _multipart_copy(self._client, self.bucket, src, dst, size, replace)
            return
        extra = (
            {"MetadataDirective": "COPY"} if replace is None else {"MetadataDirective": "REPLACE", **replace}
        )
        # S3 computes the copy's own SHA-256 (one part, so of the whole object): stat() then knows
        # the sha256 of bytes that arrived through a presigned PUT, which carry no metadata of ours.
        extra["ChecksumAlgorithm"] = "SHA256"
        with _s3_errors(src):
            self._client.copy_object(
                Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}, **extra
            )


class _S3Writer(BlobWriter):
    """Small blobs go up in one PUT at commit; larger ones as a multipart upload, a part per filled buffer."""

    def __init__(self, store: S3BlobStore, key: str, content_type: str, max_bytes: int | None) -> None:
        self._store, self._key, self._content_type = store, key, content_type
        self._meter = ByteMeter(max_bytes)
        self._pending = bytearray()
        self._upload: _MultipartUpload | None = None

    def write(self, chunk: bytes) -> None:
        self._meter.add(chunk)
        self._pending += chunk
        if len(self._pending) >= self._store.part_bytes:
            if self._upload is None:
                self._upload = self._store.start_multipart(self._key, self._content_type)
            self._upload.add_part(self._pending)
            self._pending = bytearray()  # a new buffer: the sent one may still be referenced by botocore

    def commit(self) -> BlobInfo:
        sha256 = self._meter.sha256
        if self._upload is None:
            self._store.put_small(self._key, self._pending, self._content_type, sha256)
        else:
            self._upload.finish(self._pending)
            # The sha256 is known only now, and metadata is fixed at upload creation: rewrite it in place.
            self._store.set_metadata(self._key, self._meter.size, sha256, self._content_type)
        return BlobInfo(key=self._key, size=self._meter.size, sha256=sha256)

    def abort(self) -> None:
        if self._upload is not None:
            self._upload.abort_or_delete()


class _MultipartUpload:
    """One in-progress multipart upload: parts go up as they fill, and it is aborted on any failure."""

    def __init__(
        self, client: Any, bucket: str, key: str, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._parts: list[dict[str, Any]] = []
        self._completed = False
        with _s3_errors(key):
            created = client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type, Metadata=metadata or {}
            )
        self._upload_id: str = created["UploadId"]

    def add_part(self, data: bytes | bytearray) -> None:
        number = len(self._parts) + 1
        with _s3_errors(self._key):
            sent = self._client.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def add_copied_part(self, src: str, first: int, last: int) -> None:
        number = len(self._parts) + 1
        with _s3_errors(self._key):
            sent = self._client.upload_part_copy(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                CopySource={"Bucket": self._bucket, "Key": src},
                CopySourceRange=f"bytes={first}-{last}",
            )
        self._parts.append({"PartNumber": number, "ETag": sent["CopyPartResult"]["ETag"]})

    def finish(self, last_part: bytes | bytearray = b"") -> None:
        if last_part:
            self.add_part(last_part)
        with _s3_errors(self._key):
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._completed = True

    def abort_or_delete(self) -> None:
        """Best effort cleanup while another error is already on its way up: never mask it."""
        try:
            if self._completed:  # the object exists but its sha256 could not be recorded
                self._client.delete_object(Bucket=self._bucket, Key=self._key)
            else:
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )
        except (ClientError, BotoCoreError):
            pass


def _multipart_copy(
    client: Any, bucket: str, src: str, dst: str, size: int, replace: dict[str, Any] | None
) -> None:
    """Copy past CopyObject's 5 GiB limit in ranged parts, with the source's (or `replace`'s) metadata."""
    if replace is None:
        with _s3_errors(src):
            head = client.head_object(Bucket=bucket, Key=src)
        replace = {"Metadata": head.get("Metadata", {}), "ContentType": head.get("ContentType")}
    content_type = replace.get("ContentType") or "application/octet-stream"
    upload = _MultipartUpload(client, bucket, dst, content_type, replace.get("Metadata"))
    try:
        for first in range(0, size, _COPY_PART_BYTES):
            upload.add_copied_part(src, first, min(first + _COPY_PART_BYTES, size) - 1)
        upload.finish()
    except BaseException:
        upload.abort_or_delete()
        raise


def _body_chunks(body: Any, key: str) -> Iterator[bytes]:
    with body, _s3_errors(key):
        yield from body.iter_chunks(CHUNK_BYTES)


def _full_object_sha256(checksum: str | None) -> str | None:
    """S3's ChecksumSHA256 as hex when it is of the whole object (a multipart object's reads 'xxx-N')."""
    if not checksum or "-" in checksum:
        return None
    try:
        digest = base64.b64decode(checksum, validate=True)
    except binascii.Error:
        return None
    return digest.hex() if len(digest) == 32 else None
