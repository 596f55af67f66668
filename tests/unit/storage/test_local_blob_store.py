"""LocalBlobStore on a temp directory: atomic writes, recorded checksums, safe keys, signed URLs."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.settings import Settings
from app.signing import InvalidTokenError, Signer
from app.storage import (
    BlobGrant,
    BlobNotFoundError,
    BlobTooLargeError,
    ChecksumMismatchError,
    LocalBlobStore,
    S3BlobStore,
    StorageError,
    open_blob_store,
    verify_blob_token,
)

BASE_URL = "http://tuneforge.test/"


@pytest.fixture
def signer() -> Signer:
    return Signer("unit-test-secret", "blob")


@pytest.fixture
def store(tmp_path: Path, signer: Signer) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", signer)


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_round_trip_records_size_and_sha256(store: LocalBlobStore) -> None:
    data = b"hello, blob\n" * 1000
    info = store.put_stream("datasets/t1/train.csv", [data[:5000], data[5000:]])
    expected = hashlib.sha256(data).hexdigest()
    assert (info.size, info.sha256) == (len(data), expected)
    assert store.stat("datasets/t1/train.csv") == info
    assert store.read_bytes("datasets/t1/train.csv", expected_sha256=expected) == data
    assert store.exists("datasets/t1/train.csv")
    store.delete("datasets/t1/train.csv/below-a-file")  # no blob there: nothing to do
    store.delete("datasets/t1/train.csv")
    assert _files_under(store.root) == []


def test_file_objects_are_read_in_chunks(store: LocalBlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    info = store.put_stream("k/blob.bin", io.BytesIO(data))
    assert info.size == len(data)
    assert list(map(len, store.iter_chunks("k/blob.bin"))) == [1024 * 1024] * 3 + [7]


def test_generator_of_many_chunks_streams_in(store: LocalBlobStore) -> None:
    def chunks() -> Iterator[bytes]:
        for i in range(5000):
            yield i.to_bytes(4, "big") * 64

    info = store.put_stream("big/many.bin", chunks())
    assert info.size == 5000 * 256
    assert info.sha256 == hashlib.sha256(b"".join(chunks())).hexdigest()


def test_overwrite_replaces_bytes_and_checksum(store: LocalBlobStore) -> None:
    store.put_stream("a/x", [b"first"])
    info = store.put_stream("a/x", [b"second version"])
    assert store.stat("a/x") == info
    assert store.read_bytes("a/x", expected_sha256=info.sha256) == b"second version"


def test_corrupt_file_on_disk_fails_verification(store: LocalBlobStore) -> None:
    info = store.put_stream("a/model.safetensors", [b"weights" * 100])
    (store.root / "a" / "model.safetensors").write_bytes(b"bit rot" * 100)
    with pytest.raises(ChecksumMismatchError) as caught:
        store.read_bytes("a/model.safetensors", expected_sha256=info.sha256)
    assert caught.value.expected == info.sha256
    assert store.read_bytes("a/model.safetensors") == b"bit rot" * 100  # no expectation, no check


def test_sidecar_of_another_write_is_not_trusted(store: LocalBlobStore) -> None:
    store.put_stream("a/x", [b"first"])
    sidecar = store.root / ".tf-meta" / "a" / "x.json"
    stale = sidecar.read_bytes()
    second = store.put_stream("a/x", [b"second"])
    sidecar.write_bytes(stale)  # what a crash or a racing writer could leave behind
    assert store.stat("a/x").sha256 is None
    assert store.read_bytes("a/x", expected_sha256=second.sha256) == b"second"


def test_past_max_bytes_aborts_and_leaves_nothing(store: LocalBlobStore) -> None:
    with pytest.raises(BlobTooLargeError) as caught:
        store.put_stream("up/too/big.bin", (b"x" * 1000 for _ in range(10)), max_bytes=5000)
    assert caught.value.limit == 5000
    assert not store.exists("up/too/big.bin")
    assert _files_under(store.root) == []
    assert not (store.root / "up").exists()


def test_failing_source_leaves_nothing_and_keeps_the_old_blob(store: LocalBlobStore) -> None:
    store.put_stream("a/b", [b"old"])

    def broken() -> Iterator[bytes]:
        yield b"new bytes"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream("a/b", broken())
    assert store.read_bytes("a/b", expected_sha256=hashlib.sha256(b"old").hexdigest()) == b"old"
    assert _files_under(store.root / "a") == ["b"]


def test_exactly_max_bytes_is_allowed(store: LocalBlobStore) -> None:
    assert store.put_stream("k", [b"x" * 10], max_bytes=10).size == 10


@pytest.mark.parametrize(
    "key",
    ["/etc/passwd", "../outside", "a/../../b", "a/./b", "a//b", "a\\b", "", "a/", ".tf-meta/x", "a/\x00"],
)
def test_keys_that_could_escape_or_collide_are_rejected(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_stream(key, [b"x"])
    with pytest.raises(ValueError):
        store.presigned_get_url(key, expires_in=60, base_url=BASE_URL)
    assert not (store.root.parent / "outside").exists()


def test_missing_blob_raises_not_found_at_call_time(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.iter_chunks("nope")
    with pytest.raises(BlobNotFoundError):
        store.stat("nope")
    assert not store.exists("nope")
    store.delete("nope")  # idempotent


def test_delete_prefix_respects_segment_boundaries(store: LocalBlobStore) -> None:
    for key in ("a/b/x", "a/b/y/z", "a/bc", "a/c"):
        store.put_stream(key, [key.encode()])
    assert store.list_keys("a/b/") == ["a/b/x", "a/b/y/z"]
    assert store.list_keys("a/b") == ["a/b/x", "a/b/y/z", "a/bc"]  # a plain string prefix, as in S3
    assert store.delete_prefix("a/b/") == 2
    assert store.list_keys("") == ["a/bc", "a/c"]
    assert not (store.root / "a" / "b").exists()
    assert store.delete_prefix("a/b/") == 0


def test_listing_hides_sidecars_and_temp_files(store: LocalBlobStore) -> None:
    store.put_stream("x/y", [b"1"])
    (store.root / "x" / ".tf-tmp-leftover").write_bytes(b"partial")
    assert store.list_keys("") == ["x/y"]


def test_list_blobs_gives_size_and_write_time_and_hides_bookkeeping(store: LocalBlobStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    store.put_stream("x/y", [b"12345"])
    store.put_stream("x/z/w", [b"1"])
    store.put_stream("xa", [b"1"])
    (store.root / "x" / ".tf-tmp-leftover").write_bytes(b"partial")
    listed = sorted(store.list_blobs("x/"), key=lambda blob: blob.key)
    assert [(blob.key, blob.size) for blob in listed] == [("x/y", 5), ("x/z/w", 1)]
    assert all(before < blob.modified <= datetime.now(UTC) for blob in listed)


def test_copy_keeps_sha256_and_refuses_a_corrupt_source(store: LocalBlobStore) -> None:
    info = store.put_stream("src/a", [b"payload"], content_type="text/csv")
    store.copy("src/a", "dst/a")
    assert store.stat("dst/a").sha256 == info.sha256
    (store.root / "src" / "a").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError):
        store.copy("src/a", "dst/b")
    assert not store.exists("dst/b")


def test_signed_urls_round_trip(store: LocalBlobStore, signer: Signer) -> None:
    put = store.presigned_put_url("d/f.csv", expires_in=60, base_url=BASE_URL)
    get = store.presigned_get_url(
        "d/f.csv", expires_in=60, base_url=BASE_URL, filename="f.csv", sha256="ab" * 32
    )
    assert put.startswith("http://tuneforge.test/blobs/")
    assert verify_blob_token(signer, put.rsplit("/", 1)[1], "PUT") == BlobGrant("d/f.csv", "PUT")
    assert verify_blob_token(signer, get.rsplit("/", 1)[1], "GET") == BlobGrant(
        "d/f.csv", "GET", "f.csv", "ab" * 32
    )


def test_signed_token_for_put_cannot_get(store: LocalBlobStore, signer: Signer) -> None:
    token = store.presigned_put_url("d/f", expires_in=60, base_url=BASE_URL).rsplit("/", 1)[1]
    with pytest.raises(InvalidTokenError):
        verify_blob_token(signer, token, "GET")


def test_tampered_or_foreign_token_is_rejected(store: LocalBlobStore, signer: Signer) -> None:
    token = store.presigned_get_url("d/f", expires_in=60, base_url=BASE_URL).rsplit("/", 1)[1]
    forged_body = Signer("unit-test-secret", "blob").dumps(
        {"k": "other", "m": "GET", "f": None}, expires_in=60
    )
    tampered = forged_body.split(".")[0] + "." + token.split(".")[1]
    with pytest.raises(InvalidTokenError):
        verify_blob_token(signer, tampered, "GET")
    with pytest.raises(InvalidTokenError):
        verify_blob_token(Signer("unit-test-secret", "upload"), token, "GET")


def test_expired_token_is_rejected(store: LocalBlobStore, signer: Signer) -> None:
    token = store.presigned_get_url("d/f", expires_in=-1, base_url=BASE_URL).rsplit("/", 1)[1]
    with pytest.raises(InvalidTokenError, match="expired"):
        verify_blob_token(signer, token, "GET")


def test_token_with_escaping_key_is_rejected(signer: Signer) -> None:
    token = signer.dumps({"k": "../../etc/passwd", "m": "GET", "f": None}, expires_in=60)
    with pytest.raises(InvalidTokenError):
        verify_blob_token(signer, token, "GET")


def test_check_creates_root_and_fails_when_unwritable(tmp_path: Path, signer: Signer) -> None:
    store = LocalBlobStore(tmp_path / "new" / "blobs", signer)
    store.check()
    assert store.root.is_dir() and _files_under(store.root) == []
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        LocalBlobStore(blocker / "blobs", signer).check()


def test_open_blob_store_parses_storage_url(tmp_path: Path) -> None:
    local = open_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "blobs"
    s3 = open_blob_store(
        Settings(data_dir=tmp_path, storage_url="s3://bucket/some/prefix/", secret_key="s" * 48)
    )
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ValueError):
        open_blob_store(Settings(data_dir=tmp_path, storage_url="file://host/dir"))


def test_s3_presigned_urls_use_the_public_endpoint_when_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.storage.s3 import S3BlobStore

    # Signing is local computation; it needs credentials but no server.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    store = S3BlobStore(
        "bucket", "p", endpoint_url="http://minio:9000", public_endpoint_url="http://localhost:9000"
    )
    assert store.presigned_put_url("k", expires_in=60, base_url="", content_length=10).startswith(
        "http://localhost:9000/bucket/p/k?"
    )
    inside = S3BlobStore("bucket", "p", endpoint_url="http://minio:9000")
    assert inside.presigned_get_url("k", expires_in=60, base_url="").startswith(
        "http://minio:9000/bucket/p/k?"
    )
