"""One serving replica: its state, its /health probe, and starting and stopping its process.

A replica is one `tuneforge serve` (a whole engine with its own copy of the weights): a child process
this control plane owns, or a URL an operator runs. `serving_processes` keeps a serving key's replicas
together and decides when each starts, fails and is stopped; this module holds what one replica is.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
from tuneforge.rules.served_models import TUNEFORGE_ENGINE, engine_of

from app.db.base import utcnow
from app.errors import ServiceError
from app.settings import Settings

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0


class Health(enum.Enum):
    """What one /health probe found."""

    OK = "ok"  # 200
    UNHEALTHY = "unhealthy"  # it answered, with an error: its engine is not running
    SILENT = "silent"  # no answer within HEALTH_TIMEOUT_S (not listening yet, or wedged)


class ServingStatus(enum.StrEnum):
    """`standby` (not started) → `initializing` → `ready` | `failed`; a failed process starts again."""

    STANDBY = "standby"
    INITIALIZING = "initializing"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ServingEvent:
    kind: str  # "Initializing" | "Ready" | "Failed": the Predibase ComputeEvents vocabulary
    at: datetime
    message: str = ""


class ServingUnavailableError(ServiceError):
    """The deployment's serving process failed or is still starting; the message says which."""

    status_code = 503


@dataclass
class ServingReplica:
    """One replica of a serving key: a child process this control plane owns, or an operator's URL."""

    key: str
    index: int  # its place in the key's replicas: what events and tenants see
    name: str  # what routing hashes: the operator's URL, or `replica-<index>` (ours change port)
    url: str
    events: list[ServingEvent]  # the key's timeline, shared by its replicas
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    status: ServingStatus = ServingStatus.INITIALIZING
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    failed_at: float | None = None
    silent_since: float | None = None  # when a ready process last stopped answering /health
    in_flight: int = 0  # proxied requests whose response has not ended
    # (tenant, adapter id) pairs preloaded here; cleared when it fails, so a restart loads them again.
    warmed: set[tuple[str, str]] = field(default_factory=set)

    @property
    def owned(self) -> bool:
        return self.log_path is not None

    def record(self, status: ServingStatus, kind: str, message: str = "") -> None:
        self.status = status
        # The index, never the URL or pid: events are shown to tenants.
        text = f"replica {self.index}: {message}" if message else f"replica {self.index}"
        self.events.append(ServingEvent(kind=kind, at=utcnow(), message=text))
        log.info("serving %s replica %d: %s %s", self.key, self.index, kind, message)


def spawn(settings: Settings, key: str, index: int, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `tuneforge serve` for `key` on `port`, its output appended to a log of its own."""
    suffix = "" if index == 0 else f"-replica{index}"
    log_path = settings.data_dir / "serving" / f"{_safe_file_name(key)}{suffix}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", key,
        "--host", "127.0.0.1", "--port", str(port), "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    if settings.serving_kv_cache_bytes is not None and engine_of(key) == TUNEFORGE_ENGINE:
        command += ["--kv-cache-bytes", str(settings.serving_kv_cache_bytes)]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            env=settings_environment(settings),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it reaches its children
        )
    return process, log_path


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build these same Settings (database, blob store)."""
    env = dict(os.environ)
    as_json = settings.model_dump(mode="json")  # lists of models (worker_classes) as plain JSON
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        key = f"TUNEFORGE_{name.upper()}"
        env[key] = json.dumps(as_json[name]) if isinstance(value, list | dict) else str(value)
    return env | {"PYTHONUNBUFFERED": "1"}


def being_replaced(replica: ServingReplica) -> bool:
    """A process of ours that had served, failed and is still being stopped: the next look after it
    exits starts a new one, so a request waits for that rather than fail."""
    return replica.owned and replica.ready_at is not None and process_alive(replica)


def process_alive(replica: ServingReplica) -> bool:
    return replica.process is None or replica.process.poll() is None


def probe(url: str) -> Health:
    try:
        status = httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code
    except httpx.HTTPError:
        return Health.SILENT
    return Health.OK if status == 200 else Health.UNHEALTHY


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM to the process group, SIGKILL if it has not exited within `timeout` (a wedged one)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("serving process %d did not stop within %.0f s; killing it", process.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def stop_in_background(process: subprocess.Popen[bytes] | None, timeout: float) -> threading.Thread:
    """terminate on a thread of its own (the monitor must not wait on it), not a daemon: the
    interpreter waits for it at exit rather than leave the process running."""
    stopper = threading.Thread(target=terminate, args=(process, timeout), name="serving-stop")
    stopper.start()
    return stopper


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


def _safe_file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "model"
