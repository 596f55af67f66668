"""Local model directories made once and shared: a lock per directory, and a complete directory
renamed into place (never a half-written one), for built-in models and models fetched from a store."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Held by one process at a time across the machine (and across hosts sharing a POSIX-locking fs)."""
    # flock is released by the kernel when the holder dies, so a crashed build never wedges it.
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def replace_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a scratch directory beside `target`, then rename it into place (replacing an old one).

    Caller holds `target`'s lock. A fill killed half-way leaves only a scratch directory, which the
    next fill under the lock removes; a fill that raises leaves nothing.
    """
    remove_leftovers(target)
    scratch = target.with_name(f".{target.name}.building-{uuid.uuid4().hex}")
    scratch.mkdir()
    try:
        fill(scratch)
        finalise_files(scratch)
        if target.exists():
            stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
            target.rename(stale)
            scratch.rename(target)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_leftovers(target: Path) -> None:
    """Scratch and stale directories of `target` that a killed process left behind."""
    for pattern in (f".{target.name}.building-*", f".{target.name}.stale-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def finalise_files(directory: Path) -> None:
    """Readable by every user of the cache, and on disk before the directory is renamed into place."""
    for path in directory.rglob("*"):
        if path.is_file():
            # safetensors writes 0600; serving and training may run as other users of the cache.
            path.chmod(0o644)
            # A rename is only atomic across a power cut if the renamed files' data reached disk.
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
