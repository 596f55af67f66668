"""The serving processes behind deployments: one `tuneforge serve` per base model, supervised.

Every deployment of a base model, in every tenant, shares one serving process: adapters are
resolved per request in the tenant a signed assertion names (`tuneforge.serving_auth`), so there
is nothing per deployment to run. In the embedded default the control plane starts that process
itself (lazily, on the first deployment or request), health-checks it, starts it again when it has
died, and stops it with the app or when the last deployment of its base model goes. In production
`TUNEFORGE_SERVING_URLS` names serving Deployments an operator runs; those are only health-checked.

A process of ours that answers /health with an error (its engine stopped) or does not answer for
`serving_unresponsive_seconds` (wedged) is stopped, SIGKILLed if SIGTERM does not do it, and marked
failed; the next request starts a new one. Each child is told this process's pid (`--parent-pid`) and
exits when it is gone, so no serving process outlives its control plane, even one killed outright.
"""

from __future__ import annotations

import asyncio
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
from tuneforge.serving_auth import TenantAssertions

from app.db.base import utcnow
from app.errors import ServiceError
from app.settings import Settings

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.25
HEALTH_TIMEOUT_S = 2.0
# A process that is not healthy by then is stopped and reported failed (the first start of
# smollm2-135m builds its checkpoint from the GGUF file, which takes a while on a small CPU).
START_DEADLINE_S = 900.0
# After a failed start, requests are answered 503 for this long instead of starting it again at once.
RETRY_FAILED_START_AFTER_S = 10.0
LOG_TAIL_LINES = 20
WARMUP_PROMPT = "Hello"


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
class ServingBackend:
    """One base model's server: a child process this control plane owns, or an operator's URL."""

    base_model: str
    url: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    status: ServingStatus = ServingStatus.INITIALIZING
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    failed_at: float | None = None
    silent_since: float | None = None  # when a ready process last stopped answering /health
    events: list[ServingEvent] = field(default_factory=list)
    # (tenant, adapter id) pairs to load as soon as the process is ready, and again after a restart.
    warmups: set[tuple[str, str]] = field(default_factory=set)
    warmed: set[tuple[str, str]] = field(default_factory=set)

    @property
    def owned(self) -> bool:
        return self.log_path is not None

    def record(self, status: ServingStatus, kind: str, message: str = "") -> None:
        self.status = status
        self.events.append(ServingEvent(kind=kind, at=utcnow(), message=message))
        log.info("serving %s: %s %s", self.base_model, kind, message)


class ServingSupervisor:
    """Owns every serving backend of this control plane; thread-safe (sync routes run in a pool)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: dict[str, ServingBackend] = {}
        self._assertions = TenantAssertions(settings.secret_key)
        self._lock = threading.RLock()
        self._closed = threading.Event()
        # Started with the first backend, so an app that never serves runs no extra thread.
        self._monitor: threading.Thread | None = None
        # Threads stopping processes found failed; close() waits for them too.
        self._stoppers: list[threading.Thread] = []

    # --- what the deployment service and the proxy ask ---------------------------------------

    def ensure_started(self, base_model: str, warmups: list[tuple[str, str]] | None = None) -> ServingBackend:
        """The backend for `base_model`, starting its process if there is none or it has died."""
        with self._lock:
            if self._closed.is_set():
                raise ServingUnavailableError("the control plane is shutting down")
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._watch, name="serving-monitor", daemon=True)
                self._monitor.start()
            backend = self._backends.get(base_model)
            if backend is None or self._needs_start(backend):
                backend = self._start(base_model, backend)
                self._backends[base_model] = backend
            for pair in warmups or []:
                backend.warmups.add(pair)
            return backend

    def status(self, base_model: str) -> ServingStatus:
        with self._lock:
            backend = self._backends.get(base_model)
            return backend.status if backend is not None else ServingStatus.STANDBY

    def ready_url(self, base_model: str) -> str | None:
        """The URL of `base_model`'s server if it is ready now; never starts one (for read-only views)."""
        with self._lock:
            backend = self._backends.get(base_model)
            return backend.url if backend is not None and backend.status is ServingStatus.READY else None

    def pid(self, base_model: str) -> int | None:
        """The process id of the serving process this control plane runs for `base_model`, if any."""
        with self._lock:
            backend = self._backends.get(base_model)
            return backend.process.pid if backend is not None and backend.process is not None else None

    def signed_headers(self, tenant: str, method: str, url: str, body: bytes = b"") -> dict[str, str]:
        """The assertion a serving process needs to answer this request as `tenant` (serving_auth)."""
        path = httpx.URL(url).path or "/"
        return self._assertions.headers(tenant=tenant, method=method, path=path, body=body)

    def events(self, base_model: str) -> list[ServingEvent]:
        with self._lock:
            backend = self._backends.get(base_model)
            return list(backend.events) if backend is not None else []

    async def wait_until_ready(self, base_model: str, timeout: float) -> str:
        """The URL of a healthy server for `base_model`, started if need be; 503 if it cannot be had."""
        deadline = time.monotonic() + timeout
        while True:
            backend = self.ensure_started(base_model)
            if backend.status is ServingStatus.READY:
                return backend.url
            if backend.status is ServingStatus.FAILED and not _being_replaced(backend):
                # `error` is the short reason; the process's log tail went to the operator's log only.
                raise ServingUnavailableError(
                    f"the serving process for base model {base_model!r} failed ({backend.error}); "
                    "retry shortly, or ask the operator (the control plane's log says why)"
                )
            if time.monotonic() >= deadline:
                raise ServingUnavailableError(
                    f"the serving process for base model {base_model!r} is still starting after "
                    f"{timeout:.0f} s; retry shortly"
                )
            await asyncio.sleep(0.1)

    def report_unreachable(self, base_model: str) -> None:
        """The proxy could not connect: look now rather than at the next monitor pass."""
        with self._lock:
            backend = self._backends.get(base_model)
        if backend is not None:
            health = _probe(backend.url) if _process_alive(backend) else Health.SILENT
            with self._lock:
                self._apply(backend, health)

    def stop(self, base_model: str) -> None:
        """Stop the process serving `base_model` (its last deployment is gone)."""
        with self._lock:
            backend = self._backends.pop(base_model, None)
        if backend is not None:
            _terminate(backend.process, self._stop_timeout)

    def close(self) -> None:
        """Stop every process this control plane started (the wedged ones with SIGKILL); idempotent."""
        self._closed.set()
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
            stoppers, self._stoppers = self._stoppers, []
        stoppers += [_stop_in_background(b.process, self._stop_timeout) for b in backends]
        for stopper in stoppers:
            stopper.join()
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    @property
    def _stop_timeout(self) -> float:
        return self.settings.serving_stop_timeout_seconds

    # --- starting -------------------------------------------------------------------------------

    def _needs_start(self, backend: ServingBackend) -> bool:
        if backend.process is None or backend.process.poll() is None:
            return False
        self._apply(backend, Health.SILENT)  # records why it exited, once
        recent = backend.failed_at is not None and (
            time.monotonic() - backend.failed_at < RETRY_FAILED_START_AFTER_S
        )
        # A crash after it served is restarted at once; a failed start would only fail again at once.
        return backend.ready_at is not None or not recent

    def _start(self, base_model: str, previous: ServingBackend | None) -> ServingBackend:
        events = previous.events if previous is not None else []
        warmups = previous.warmups if previous is not None else set()
        urls = self.settings.serving_urls.get(base_model)
        url = urls[0] if urls else None
        if url:
            backend = ServingBackend(
                base_model=base_model, url=url.rstrip("/"), events=events, warmups=warmups
            )
            log.info("serving %s: an operator's server at %s", base_model, backend.url)
            backend.record(ServingStatus.INITIALIZING, "Initializing", "connecting to its serving process")
            return backend
        port = _free_port()
        log_path = self.settings.data_dir / "serving" / f"{_safe_file_name(base_model)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", base_model,
            "--host", "127.0.0.1", "--port", str(port), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                env=settings_environment(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it reaches its children
            )
        backend = ServingBackend(
            base_model=base_model,
            url=f"http://127.0.0.1:{port}",
            process=process,
            log_path=log_path,
            events=events,
            warmups=warmups,
        )
        verb = "restarting" if previous is not None else "starting"
        # Pid and port are for the operator's log; events are shown to tenants.
        log.info("serving %s: %s pid %s on port %s", base_model, verb, process.pid, port)
        backend.record(ServingStatus.INITIALIZING, "Initializing", f"{verb} its serving process")
        return backend

    # --- health ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(MONITOR_INTERVAL_S):
            with self._lock:
                backends = list(self._backends.values())
            for backend in backends:
                try:
                    # The health request runs outside the lock: requests must not wait on it.
                    health = _probe(backend.url) if _process_alive(backend) else Health.SILENT
                    with self._lock:
                        if self._backends.get(backend.base_model) is backend:
                            self._apply(backend, health)
                    self._warm(backend)
                except Exception:  # the monitor must outlive any one check
                    log.exception("serving monitor: checking %s failed", backend.base_model)

    def _apply(self, backend: ServingBackend, health: Health) -> None:
        process = backend.process
        if process is not None and process.poll() is not None:
            if backend.status is not ServingStatus.FAILED:
                self._fail(backend, f"exited with code {process.returncode}", tail=True)
            return
        if health is Health.OK:
            backend.silent_since = None
            if backend.status is not ServingStatus.READY:
                backend.error = None
                backend.ready_at = time.monotonic()
                backend.record(ServingStatus.READY, "Ready")
        elif backend.status is ServingStatus.READY and not backend.owned:
            # The operator restarts it; the URL is for the operator's log, not for tenants.
            log.warning("serving %s: %s/health does not answer 200", backend.base_model, backend.url)
            self._fail(backend, "its /health does not answer 200")
        elif backend.status is ServingStatus.READY:
            reason = self._unhealthy_reason(backend, health)
            if reason is not None:  # ours, and broken: stop it; the next request starts a new one
                self._fail(backend, reason, tail=True)
                self._stop_later(process)
        elif backend.owned and self._start_overdue(backend):
            self._fail(backend, f"not healthy after {START_DEADLINE_S:.0f} s", tail=True)
            self._stop_later(process)

    def _stop_later(self, process: subprocess.Popen[bytes] | None) -> None:
        """Stop a failed process without holding up the monitor (caller holds the lock)."""
        self._stoppers = [t for t in self._stoppers if t.is_alive()]
        self._stoppers.append(_stop_in_background(process, self._stop_timeout))

    def _unhealthy_reason(self, backend: ServingBackend, health: Health) -> str | None:
        """Why a ready process of ours is to be stopped now, or None to give it more time."""
        if health is Health.UNHEALTHY:
            return "its engine stopped (/health answered an error)"
        now = time.monotonic()
        if backend.silent_since is None:
            backend.silent_since = now
        limit = self.settings.serving_unresponsive_seconds
        return f"did not answer /health for {limit:.0f} s" if now - backend.silent_since >= limit else None

    def _fail(self, backend: ServingBackend, reason: str, *, tail: bool = False) -> None:
        """`reason` is shown to tenants (errors, events): never a path, URL or log line of the shared
        process; the log tail goes to the operator's log instead."""
        if tail:
            log.warning("serving %s failed: %s; %s", backend.base_model, reason, self._log_tail(backend))
        backend.error = reason
        backend.failed_at = time.monotonic()
        backend.warmed.clear()
        backend.record(ServingStatus.FAILED, "Failed", reason)

    @staticmethod
    def _start_overdue(backend: ServingBackend) -> bool:
        overdue = time.monotonic() - backend.started_at > START_DEADLINE_S
        return backend.status is ServingStatus.INITIALIZING and overdue

    def _warm(self, backend: ServingBackend) -> None:
        """Load preloaded adapters with a one-token request each, in the tenant they belong to."""
        if backend.status is not ServingStatus.READY:
            return
        for tenant, adapter_id in sorted(backend.warmups - backend.warmed):
            backend.warmed.add((tenant, adapter_id))
            body = {"inputs": WARMUP_PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": 1}}
            content, url = json.dumps(body).encode(), f"{backend.url}/generate"
            headers = self.signed_headers(tenant, "POST", url, content) | {"Content-Type": "application/json"}
            try:
                response = httpx.post(url, content=content, headers=headers, timeout=120)
            except httpx.HTTPError as exc:
                log.warning("preloading %s for tenant %s failed: %s", adapter_id, tenant, exc)
                continue
            if response.status_code != 200:
                log.warning("preloading %s for tenant %s failed: %s", adapter_id, tenant, response.text[:300])

    def _log_tail(self, backend: ServingBackend) -> str:
        if backend.log_path is None or not backend.log_path.exists():
            return "no log"
        lines = backend.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"last lines of {backend.log_path}:\n" + "\n".join(lines)


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


def _being_replaced(backend: ServingBackend) -> bool:
    """A process of ours that had served, failed and is still being stopped: the next look after it
    exits starts a new one, so a request waits for that rather than fail."""
    return backend.owned and backend.ready_at is not None and _process_alive(backend)


def _process_alive(backend: ServingBackend) -> bool:
    return backend.process is None or backend.process.poll() is None


def _probe(url: str) -> Health:
    try:
        status = httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code
    except httpx.HTTPError:
        return Health.SILENT
    return Health.OK if status == 200 else Health.UNHEALTHY


def _terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
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


def _stop_in_background(process: subprocess.Popen[bytes] | None, timeout: float) -> threading.Thread:
    """_terminate on a thread of its own (the monitor must not wait on it), not a daemon: the
    interpreter waits for it at exit rather than leave the process running."""
    stopper = threading.Thread(target=_terminate, args=(process, timeout), name="serving-stop")
    stopper.start()
    return stopper


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _safe_file_name(base_model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base_model).strip("._") or "model"
