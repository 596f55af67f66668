"""S3BlobStore against a real S3-compatible server (moto over HTTP): parts, checksums, aborts, URLs."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest

from app.signing import Signer
from app.storage import (
    BlobInfo,
    BlobNotFoundError,
    BlobTooLargeError,
    ChecksumMismatchError,
    S3BlobStore,
    StorageError,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def store(s3_server, s3_bucket: str) -> S3BlobStore:
    return S3BlobStore(
        s3_bucket,
        "tuneforge/",
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        multipart_chunk_bytes=5 * MiB,
    )


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_small_put_is_one_object_with_sha256_metadata(store: S3BlobStore, s3_server) -> None:
    data = b"a,b\n1,2\n"
    info = store.put_stream("datasets/t/train.csv", [data], content_type="text/csv")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    head = s3_server.client().head_object(Bucket=store.bucket, Key="tuneforge/datasets/t/train.csv")
    assert head["Metadata"] == {"sha256": info.sha256}
    assert head["ContentType"] == "text/csv"
    assert store.stat("datasets/t/train.csv") == info
    assert store.read_bytes("datasets/t/train.csv", expected_sha256=info.sha256) == data


def test_multipart_put_round_trips_and_records_sha256(store: S3BlobStore, s3_server) -> None:
    parts: list[int] = []
    # Observe (not replace) the real client's calls: the upload must go up in parts as they fill.
    store._client.meta.events.register(
        "before-call.s3.UploadPart", lambda params, **_: parts.append(len(params["body"]))
    )
    data = os.urandom(11 * MiB + 123)
    info = store.put_stream("adapters/r/1/model.safetensors", _chunks(data), content_type="application/x-st")
    assert parts == [5 * MiB, 5 * MiB, MiB + 123]
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    head = s3_server.client().head_object(Bucket=store.bucket, Key="tuneforge/adapters/r/1/model.safetensors")
    assert (head["Metadata"], head["ContentType"]) == ({"sha256": info.sha256}, "application/x-st")
    out = b"".join(store.iter_chunks("adapters/r/1/model.safetensors", expected_sha256=info.sha256))
    assert out == data


def test_overwritten_bytes_fail_verification(store: S3BlobStore, s3_server) -> None:
    info = store.put_stream("k/model.bin", [b"good bytes"])
    s3_server.client().put_object(
        Bucket=store.bucket, Key="tuneforge/k/model.bin", Body=b"evil bytes", Metadata={"sha256": info.sha256}
    )
    assert store.stat("k/model.bin").sha256 == info.sha256
    with pytest.raises(ChecksumMismatchError):
        store.read_bytes("k/model.bin", expected_sha256=store.stat("k/model.bin").sha256)


@pytest.mark.parametrize("total", [3 * MiB, 12 * MiB], ids=["single", "multipart"])
def test_past_max_bytes_leaves_no_object_and_no_upload(store: S3BlobStore, s3_server, total: int) -> None:
    with pytest.raises(BlobTooLargeError):
        store.put_stream("up/big.bin", _chunks(b"x" * total), max_bytes=total - 1)
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=store.bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_failing_source_mid_multipart_aborts_the_upload(store: S3BlobStore, s3_server) -> None:
    def broken() -> Iterator[bytes]:
        yield from _chunks(b"y" * 7 * MiB)
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream("up/broken.bin", broken())
    assert not store.exists("up/broken.bin")
    assert s3_server.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_presigned_put_then_get_over_plain_http(store: S3BlobStore) -> None:
    data = b"uploaded without credentials"
    put_url = store.presigned_put_url(
        "uploads/f.csv", expires_in=300, base_url="http://unused", content_length=len(data)
    )
    httpx.put(put_url, content=data, headers={"Content-Type": "text/csv"}).raise_for_status()
    assert store.stat("uploads/f.csv").sha256 is None  # the bytes never passed through us
    get_url = store.presigned_get_url(
        "uploads/f.csv", expires_in=300, base_url="http://unused", filename="f.csv"
    )
    response = httpx.get(get_url)
    response.raise_for_status()
    assert response.content == data
    assert 'filename="f.csv"' in response.headers["content-disposition"]


def test_presigned_put_binds_the_declared_length(store: S3BlobStore) -> None:
    """S3 recomputes a presigned URL's signature over the request it gets; Content-Length is signed,
    so a body of any other length is refused (SignatureDoesNotMatch). moto does not check presigned
    signatures, so the check S3 and MinIO run is recomputed here."""
    url = store.presigned_put_url(
        "uploads/f.csv", expires_in=300, base_url="http://unused", content_length=28
    )
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["X-Amz-SignedHeaders"] == "content-length;host"
    assert _sigv4_query_signature(url, content_length=28) == query["X-Amz-Signature"]
    for other in (0, 27, 29, 5 * 1024**3):
        assert _sigv4_query_signature(url, content_length=other) != query["X-Amz-Signature"]


def test_presigned_put_without_a_length_needs_a_relay_signer(store: S3BlobStore) -> None:
    with pytest.raises(StorageError, match="undeclared size"):
        store.presigned_put_url("uploads/f.csv", expires_in=300, base_url="http://unused")
    relaying = S3BlobStore(
        store.bucket, "tuneforge/", endpoint_url="http://s3.test", url_signer=Signer("k", "blob")
    )
    url = relaying.presigned_put_url("uploads/f.csv", expires_in=300, base_url="http://api.test")
    assert url.startswith("http://api.test/blobs/")
    assert relaying.verify_url_token(url.rsplit("/", 1)[1], "PUT").key == "uploads/f.csv"


def test_copy_records_the_sha256_of_bytes_that_bypassed_us(store: S3BlobStore) -> None:
    data = b"prompt,completion\nq,a\n"
    url = store.presigned_put_url("uploads/d.csv", expires_in=300, base_url="", content_length=len(data))
    httpx.put(url, content=data).raise_for_status()
    store.copy("uploads/d.csv", "datasets/d.csv")
    assert store.stat("datasets/d.csv").sha256 == hashlib.sha256(data).hexdigest()


def _sigv4_query_signature(url: str, *, content_length: int) -> str:
    """AWS Signature V4 of a presigned PUT as S3 verifies it, for a request with this Content-Length."""
    parts = urlsplit(url)
    query = {k: v for k, v in parse_qsl(parts.query) if k != "X-Amz-Signature"}
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    headers = f"content-length:{content_length}\nhost:{parts.netloc}\n"
    canonical = "\n".join(
        ["PUT", parts.path, canonical_query, headers, query["X-Amz-SignedHeaders"], "UNSIGNED-PAYLOAD"]
    )
    scope = query["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", query["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + os.environ["AWS_SECRET_ACCESS_KEY"]).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_copy_keeps_sha256(store: S3BlobStore) -> None:
    info = store.put_stream("staging/a.bin", _chunks(os.urandom(6 * MiB)))
    store.copy("staging/a.bin", "published/a.bin")
    assert store.stat("published/a.bin") == BlobInfo("published/a.bin", info.size, info.sha256)
    store.read_bytes("published/a.bin", expected_sha256=info.sha256)


def test_missing_keys(store: S3BlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.iter_chunks("nope")
    with pytest.raises(BlobNotFoundError):
        store.stat("nope")
    with pytest.raises(BlobNotFoundError):
        store.copy("nope", "other")
    assert not store.exists("nope")
    store.delete("nope")  # idempotent


def test_delete_prefix_respects_segment_boundaries(store: S3BlobStore) -> None:
    for key in ("a/b/x", "a/b/y/z", "a/bc", "a/c"):
        store.put_stream(key, [key.encode()])
    assert store.list_keys("a/b/") == ["a/b/x", "a/b/y/z"]
    assert store.delete_prefix("a/b/") == 2
    assert store.list_keys("") == ["a/bc", "a/c"]


def test_list_blobs_gives_size_and_write_time_under_the_prefix(store: S3BlobStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=60)
    store.put_stream("x/y", [b"12345"])
    store.put_stream("x/z/w", [b"1"])
    store.put_stream("xa", [b"1"])
    listed = sorted(store.list_blobs("x/"), key=lambda blob: blob.key)
    assert [(blob.key, blob.size) for blob in listed] == [("x/y", 5), ("x/z/w", 1)]
    assert all(before < blob.modified < datetime.now(UTC) + timedelta(seconds=60) for blob in listed)


def test_keys_are_validated_like_the_local_store(store: S3BlobStore) -> None:
    with pytest.raises(ValueError):
        store.put_stream("../escape", [b"x"])


def test_check_passes_for_the_bucket_and_fails_for_a_missing_one(store: S3BlobStore, s3_server) -> None:
    store.check()
    missing = S3BlobStore("no-such-bucket-tf", endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    with pytest.raises(StorageError):
        missing.check()
