"""The local-directory blob store (the embedded default) and its control-plane-signed URLs."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import IO

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
from app.storage.streams import RESERVED_PREFIX, ByteMeter, validate_key, verified_chunks
from app.storage.urls import BlobUrls

_META_DIR = f"{RESERVED_PREFIX}meta"
_TEMP_PREFIX = f"{RESERVED_PREFIX}tmp-"


class LocalBlobStore(BlobStore):
    """Blobs as files under `root`, sha256 sidecars under `root/.tf-meta/`, URLs served by the API."""

    def __init__(self, root: Path, signer: Signer) -> None:
        self.root = Path(root)
        self._urls = BlobUrls(signer)

    def verify_url_token(self, token: str, method: str) -> BlobGrant:
        return self._urls.verify(token, method)

    def open_writer(
        self, key: str, *, content_type: str = "application/octet-stream", max_bytes: int | None = None
    ) -> BlobWriter:
        path = self._path(key)
        temp, handle = self._open_temp(path.parent)
        return _LocalWriter(self, key, path, temp, handle, content_type, max_bytes)

    def iter_chunks(self, key: str, *, expected_sha256: str | None = None) -> Iterator[bytes]:
        # Opened here, not in the generator, so a missing blob fails at the call (before a response starts).
        try:
            handle = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFoundError(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc
        return verified_chunks(_file_chunks(handle), key, expected_sha256)

    def stat(self, key: str) -> BlobInfo:
        found = self._stat_file(key)
        return BlobInfo(key=key, size=found.st_size, sha256=self._read_meta(key, found).get("sha256"))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return  # 'a/b' is a directory, or 'a' is a file: either way there is no blob 'a/b' to delete
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r}: {exc}") from exc
        self.prune_empty_dirs(path.parent)
        self.prune_empty_dirs(self._meta_path(key).parent)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in self._walk(prefix))

    def list_blobs(self, prefix: str) -> Iterator[StoredBlob]:
        for key, path in self._walk(prefix):
            try:
                found = path.stat()
            except FileNotFoundError:
                continue  # deleted since the walk saw it
            modified = datetime.fromtimestamp(found.st_mtime, UTC)
            yield StoredBlob(key=key, size=found.st_size, modified=modified)

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, path) of every blob under `prefix`, leaving out our sidecars and temp files."""
        validate_key(prefix, allow_prefix=True)
        # Only the directory the prefix lies in can hold matches: walk that, not the whole store.
        start = self.root / prefix.rpartition("/")[0]
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [name for name in dirnames if not name.startswith(RESERVED_PREFIX)]
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if relative == "." else f"{relative}/{name}"
                if not name.startswith(RESERVED_PREFIX) and key.startswith(prefix):
                    yield key, Path(dirpath) / name

    def copy(self, src: str, dst: str) -> None:
        # Re-streaming verifies the source against its recorded sha256 before the copy becomes visible.
        recorded = self._read_meta(src, self._stat_file(src))
        content_type = recorded.get("content_type", "application/octet-stream")
        chunks = self.iter_chunks(src, expected_sha256=recorded.get("sha256"))
        self.put_stream(dst, chunks, content_type=content_type)

    def presigned_put_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        content_length: int | None = None,
        closed_by: str | None = None,
    ) -> str:
        grant = BlobGrant(key, "PUT", closed_by=closed_by)
        return self._urls.url(base_url, grant, expires_in=expires_in)

    def presigned_get_url(
        self,
        key: str,
        *,
        expires_in: int,
        base_url: str,
        filename: str | None = None,
        sha256: str | None = None,
    ) -> str:
        return self._urls.url(base_url, BlobGrant(key, "GET", filename, sha256), expires_in=expires_in)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TEMP_PREFIX}probe-{secrets.token_hex(8)}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"blob directory {self.root} is not writable: {exc}") from exc

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / _META_DIR / f"{validate_key(key)}.json"

    def _stat_file(self, key: str) -> os.stat_result:
        try:
            found = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(key) from None
        if not S_ISREG(found.st_mode):
            raise BlobNotFoundError(key)
        return found

    def _read_meta(self, key: str, found: os.stat_result) -> dict[str, str]:
        """The sidecar, if it describes this very file; a crash or a racing writer can leave a stale one."""
        try:
            meta: dict[str, str] = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return {}  # written without passing through us: checksum unknown
        return meta if meta.get("file") == _file_id(found) else {}

    def write_meta(self, key: str, meta: dict[str, str]) -> None:
        path = self._meta_path(key)
        temp, handle = self._open_temp(path.parent)
        try:
            with handle:
                handle.write(json.dumps(meta).encode())
            os.replace(temp, path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StorageError(f"cannot record metadata of {key!r}: {exc}") from exc

    def _open_temp(self, directory: Path) -> tuple[Path, IO[bytes]]:
        """A fresh temp file in `directory`, so the final os.replace stays on one filesystem (atomic)."""
        temp = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        for _ in range(3):  # a concurrent delete may prune the directory between mkdir and open
            try:
                directory.mkdir(parents=True, exist_ok=True)
                return temp, temp.open("xb")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot write under {directory}: {exc}") from exc
        raise StorageError(f"cannot write under {directory}: it keeps disappearing")

    def prune_empty_dirs(self, directory: Path) -> None:
        """Remove directories left empty, up to (not including) the root, so deletes leave no trace."""
        root = self.root.resolve()
        current = directory.resolve()
        while current != root and root in current.parents:
            try:
                current.rmdir()
            except OSError:
                return  # not empty (or already gone): stop climbing
            current = current.parent


def _file_id(found: os.stat_result) -> str:
    # Not the size: a file damaged in place must still be checked against its recorded sha256.
    return f"{found.st_dev}:{found.st_ino}"


@contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """Our own file-system failures become StorageError; errors raised by the caller's source do not."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{action}: {exc}") from exc


class _LocalWriter(BlobWriter):
    """Bytes go to a temp file beside the target; commit records the sha256, then renames it into place."""

    def __init__(
        self,
        store: LocalBlobStore,
        key: str,
        path: Path,
        temp: Path,
        handle: IO[bytes],
        content_type: str,
        max_bytes: int | None,
    ) -> None:
        self._store, self._key, self._path, self._temp, self._handle = store, key, path, temp, handle
        self._content_type = content_type
        self._meter = ByteMeter(max_bytes)

    def write(self, chunk: bytes) -> None:
        self._meter.add(chunk)
        with _disk_errors(f"cannot write {self._key!r}"):
            self._handle.write(chunk)

    def commit(self) -> BlobInfo:
        with _disk_errors(f"cannot write {self._key!r}"):
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            # Sidecar first, naming the temp file's inode (os.replace keeps it): the blob is never
            # visible without its sha256, and a sidecar left by a crash or a racing writer is ignored.
            meta = {
                "sha256": self._meter.sha256,
                "content_type": self._content_type,
                "file": _file_id(self._temp.stat()),
            }
        self._store.write_meta(self._key, meta)
        with _disk_errors(f"cannot write {self._key!r}"):
            os.replace(self._temp, self._path)
        return BlobInfo(key=self._key, size=self._meter.size, sha256=self._meter.sha256)

    def abort(self) -> None:
        try:
            self._handle.close()
            self._temp.unlink(missing_ok=True)
        except OSError:
            pass
        self._store.prune_empty_dirs(self._path.parent)


def _file_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
