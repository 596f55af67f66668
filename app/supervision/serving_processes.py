"""The serving processes behind deployments: each serving key's replicas, supervised and routed to.

Every deployment of a serving key (a base model, `version:<uuid>`, `vllm:<model>`), in every tenant,
shares the key's replicas: adapters are resolved per request in the tenant a signed assertion names
(`tuneforge.serving_auth`), so there is nothing per deployment to run. In the embedded default the
control plane starts the replicas itself (lazily, on the first deployment or request; as many as the
largest `maxReplicas` among the key's deployments), health-checks each, starts one again when it has
died, and stops them with the app or when the last deployment of the key goes. In production
`TUNEFORGE_SERVING_URLS` lists the replicas an operator runs; those are only health-checked.

A key is ready while any replica is. A request goes to the replica `routing` picks for its tenant and
adapter among the ready ones, so an adapter's requests meet the replica where it is loaded.

A process of ours that answers /health with an error (its engine stopped) or does not answer for
`serving_unresponsive_seconds` (wedged) is stopped, SIGKILLed if SIGTERM does not do it, and marked
failed; the next request starts a new one. Each child is told this process's pid (`--parent-pid`) and
exits when it is gone, so no serving process outlives its control plane, even one killed outright.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import httpx
from tuneforge.serving_auth import TenantAssertions

from app.settings import Settings
from app.supervision import routing
from app.supervision.serving_replicas import (
    Health,
    ServingEvent,
    ServingReplica,
    ServingStatus,
    ServingUnavailableError,
    being_replaced,
    free_port,
    probe,
    process_alive,
    settings_environment,
    spawn,
    stop_in_background,
)

__all__ = [
    "ReplicaLease",
    "ServingEvent",
    "ServingGroup",
    "ServingStatus",
    "ServingSupervisor",
    "ServingUnavailableError",
    "settings_environment",
]

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.25
# A process that is not healthy by then is stopped and reported failed (the first start of
# smollm2-135m builds its checkpoint from the GGUF file, which takes a while on a small CPU).
START_DEADLINE_S = 900.0
# After a failed start, requests are answered 503 for this long instead of starting it again at once.
RETRY_FAILED_START_AFTER_S = 10.0
LOG_TAIL_LINES = 20
WARMUP_PROMPT = "Hello"


@dataclass
class ServingGroup:
    """A serving key's replicas, its timeline, and the adapters its deployments preload."""

    key: str
    replicas: list[ServingReplica] = field(default_factory=list)
    events: list[ServingEvent] = field(default_factory=list)
    # (tenant, adapter id) pairs to load as soon as a replica is ready, and again after a restart.
    warmups: set[tuple[str, str]] = field(default_factory=set)

    @property
    def status(self) -> ServingStatus:
        statuses = {replica.status for replica in self.replicas}
        for status in (ServingStatus.READY, ServingStatus.INITIALIZING, ServingStatus.FAILED):
            if status in statuses:
                return status
        return ServingStatus.STANDBY

    @property
    def url(self) -> str:
        """The first replica's URL (what a one-replica key is reached at)."""
        return self.replicas[0].url

    def ready(self) -> list[ServingReplica]:
        return [replica for replica in self.replicas if replica.status is ServingStatus.READY]


@dataclass
class ReplicaLease:
    """One proxied request's hold on a replica, counted in its in-flight load until released."""

    index: int
    url: str
    _replica: ServingReplica
    _lock: threading.RLock
    _released: bool = False

    def release(self) -> None:
        with self._lock:
            if not self._released:
                self._released = True
                self._replica.in_flight -= 1


class ServingSupervisor:
    """Owns every serving replica of this control plane; thread-safe (sync routes run in a pool)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._groups: dict[str, ServingGroup] = {}
        self._assertions = TenantAssertions(settings.secret_key)
        self._lock = threading.RLock()
        self._closed = threading.Event()
        # Started with the first replica, so an app that never serves runs no extra thread.
        self._monitor: threading.Thread | None = None
        # Threads stopping processes found failed (or no longer wanted); close() waits for them too.
        self._stoppers: list[threading.Thread] = []
        # Seconds between health passes, and passes made: a test that has the proxy find a dead
        # replica first lengthens the one and waits for the next of the other.
        self.monitor_interval = MONITOR_INTERVAL_S
        self.monitor_passes = 0

    # --- what the deployment service and the proxy ask ---------------------------------------

    def ensure_started(
        self, key: str, warmups: list[tuple[str, str]] | None = None, replicas: int | None = None
    ) -> ServingGroup:
        """`key`'s replicas, starting any that is not running. `replicas` is how many to run of our own
        (None: as many as now, at least one); where an operator lists them, they are the replicas."""
        with self._lock:
            if self._closed.is_set():
                raise ServingUnavailableError("the control plane is shutting down")
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._watch, name="serving-monitor", daemon=True)
                self._monitor.start()
            group = self._groups.setdefault(key, ServingGroup(key))
            urls = self.settings.serving_urls.get(key)
            wanted = len(urls) if urls else min(replicas or len(group.replicas) or 1, self._max_replicas)
            for extra in group.replicas[wanted:]:  # no deployment asks for that many any more
                log.info("serving %s replica %d: stopping, no longer wanted", key, extra.index)
                self._stop_later(extra)
            del group.replicas[wanted:]
            for index in range(wanted):
                current = group.replicas[index] if index < len(group.replicas) else None
                if current is None or self._needs_start(current):
                    fresh = self._start(group, index, current, urls[index] if urls else None)
                    group.replicas[index:index + 1] = [fresh]  # fmt: skip
            group.warmups.update(warmups or [])
            return group

    def resize(self, key: str, replicas: int) -> None:
        """Run `replicas` of `key`'s own replicas if it is running; start nothing that is not."""
        with self._lock:
            running = key in self._groups
        if running:
            self.ensure_started(key, replicas=replicas)

    def status(self, key: str) -> ServingStatus:
        with self._lock:
            group = self._groups.get(key)
            return group.status if group is not None else ServingStatus.STANDBY

    def ready_urls(self, key: str) -> list[str]:
        """The URLs of `key`'s ready replicas; never starts one (for read-only views)."""
        with self._lock:
            group = self._groups.get(key)
            return [replica.url for replica in group.ready()] if group is not None else []

    def ready_url(self, key: str) -> str | None:
        """The URL of one ready replica of `key`, if any; never starts one."""
        urls = self.ready_urls(key)
        return urls[0] if urls else None

    def replica_count(self, key: str) -> int:
        with self._lock:
            group = self._groups.get(key)
            return len(group.replicas) if group is not None else 0

    def pid(self, key: str, replica: int = 0) -> int | None:
        """The process id of replica `replica` of `key`, where this control plane runs it."""
        with self._lock:
            group = self._groups.get(key)
            if group is None or replica >= len(group.replicas):
                return None
            process = group.replicas[replica].process
            return process.pid if process is not None else None

    def signed_headers(self, tenant: str, method: str, url: str, body: bytes = b"") -> dict[str, str]:
        """The assertion a serving process needs to answer this request as `tenant` (serving_auth)."""
        path = httpx.URL(url).path or "/"
        return self._assertions.headers(tenant=tenant, method=method, path=path, body=body)

    def events(self, key: str) -> list[ServingEvent]:
        with self._lock:
            group = self._groups.get(key)
            return list(group.events) if group is not None else []

    async def acquire(
        self, key: str, route_key: str, timeout: float, avoid: frozenset[int] = frozenset()
    ) -> ReplicaLease:
        """A ready replica of `key` for a request of `route_key` (routing), started if need be, other
        than the replicas in `avoid`; 503 if none can be had within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            group = self.ensure_started(key)
            with self._lock:
                lease = self._lease(group, route_key, avoid)
            if lease is not None:
                return lease
            failed = [r for r in group.replicas if r.status is ServingStatus.FAILED and not being_replaced(r)]
            if len(failed) == len(group.replicas):
                # `error` is the short reason; the process's log tail went to the operator's log only.
                raise ServingUnavailableError(
                    f"the serving process for base model {key!r} failed ({failed[0].error}); "
                    "retry shortly, or ask the operator (the control plane's log says why)"
                )
            if time.monotonic() >= deadline:
                raise ServingUnavailableError(
                    f"the serving process for base model {key!r} is still starting after "
                    f"{timeout:.0f} s; retry shortly"
                )
            await asyncio.sleep(0.1)

    async def wait_until_ready(self, key: str, timeout: float) -> str:
        """The URL of a ready replica of `key` (the base model's), started if need be; 503 if none."""
        lease = await self.acquire(key, routing.route_key("", ""), timeout)
        lease.release()
        return lease.url

    def report_unreachable(self, key: str, replica: int | None = None) -> None:
        """The proxy could not connect: look at that replica (all, for None) now, not at the next pass."""
        with self._lock:
            group = self._groups.get(key)
            replicas = list(group.replicas) if group is not None else []
        for candidate in replicas if replica is None else replicas[replica : replica + 1]:
            health = probe(candidate.url) if process_alive(candidate) else Health.SILENT
            with self._lock:
                self._apply(candidate, health)

    def stop(self, key: str) -> None:
        """Stop `key`'s replicas (its last deployment is gone)."""
        with self._lock:
            group = self._groups.pop(key, None)
        if group is not None:
            stoppers = [stop_in_background(r.process, self._stop_timeout) for r in group.replicas]
            for stopper in stoppers:
                stopper.join()

    def close(self) -> None:
        """Stop every process this control plane started (the wedged ones with SIGKILL); idempotent."""
        self._closed.set()
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
            stoppers, self._stoppers = self._stoppers, []
        replicas = [replica for group in groups for replica in group.replicas]
        stoppers += [stop_in_background(r.process, self._stop_timeout) for r in replicas]
        for stopper in stoppers:
            stopper.join()
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    @property
    def _stop_timeout(self) -> float:
        return self.settings.serving_stop_timeout_seconds

    @property
    def _max_replicas(self) -> int:
        return self.settings.serving_max_replicas

    # --- routing --------------------------------------------------------------------------------

    def _lease(self, group: ServingGroup, route_key: str, avoid: frozenset[int]) -> ReplicaLease | None:
        """Hold the replica routing picks among the ready ones not avoided (caller holds the lock)."""
        ready = [replica for replica in group.ready() if replica.index not in avoid]
        order = routing.choose(route_key, [r.name for r in ready], [r.in_flight for r in ready])
        if not order:
            return None
        chosen = ready[order[0]]
        chosen.in_flight += 1
        return ReplicaLease(index=chosen.index, url=chosen.url, _replica=chosen, _lock=self._lock)

    # --- starting -------------------------------------------------------------------------------

    def _needs_start(self, replica: ServingReplica) -> bool:
        if replica.process is None or replica.process.poll() is None:
            return False
        self._apply(replica, Health.SILENT)  # records why it exited, once
        recent = replica.failed_at is not None and (
            time.monotonic() - replica.failed_at < RETRY_FAILED_START_AFTER_S
        )
        # A crash after it served is restarted at once; a failed start would only fail again at once.
        return replica.ready_at is not None or not recent

    def _start(
        self, group: ServingGroup, index: int, previous: ServingReplica | None, url: str | None
    ) -> ServingReplica:
        if url:
            url = url.rstrip("/")
            replica = ServingReplica(key=group.key, index=index, name=url, url=url, events=group.events)
            log.info("serving %s replica %d: an operator's server at %s", group.key, index, url)
            replica.record(ServingStatus.INITIALIZING, "Initializing", "connecting to its serving process")
            return replica
        port = free_port()
        process, log_path = spawn(self.settings, group.key, index, port)
        replica = ServingReplica(
            key=group.key,
            index=index,
            name=f"replica-{index}",
            url=f"http://127.0.0.1:{port}",
            events=group.events,
            process=process,
            log_path=log_path,
        )
        verb = "restarting" if previous is not None else "starting"
        # Pid and port are for the operator's log; events are shown to tenants.
        log.info("serving %s replica %d: %s pid %s on port %s", group.key, index, verb, process.pid, port)
        replica.record(ServingStatus.INITIALIZING, "Initializing", f"{verb} its serving process")
        return replica

    # --- health ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(self.monitor_interval):
            with self._lock:
                groups = list(self._groups.values())
            for group in groups:
                try:
                    for replica in list(group.replicas):
                        # The health request runs outside the lock: requests must not wait on it.
                        health = probe(replica.url) if process_alive(replica) else Health.SILENT
                        with self._lock:
                            if self._groups.get(group.key) is group and replica in group.replicas:
                                self._apply(replica, health)
                    self._warm(group)
                except Exception:  # the monitor must outlive any one check
                    log.exception("serving monitor: checking %s failed", group.key)
            self.monitor_passes += 1

    def _apply(self, replica: ServingReplica, health: Health) -> None:
        process = replica.process
        if process is not None and process.poll() is not None:
            if replica.status is not ServingStatus.FAILED:
                self._fail(replica, f"exited with code {process.returncode}", tail=True)
            return
        if health is Health.OK:
            replica.silent_since = None
            if replica.status is not ServingStatus.READY:
                replica.error = None
                replica.ready_at = time.monotonic()
                replica.record(ServingStatus.READY, "Ready")
        elif replica.status is ServingStatus.READY and not replica.owned:
            # The operator restarts it; the URL is for the operator's log, not for tenants.
            log.warning("serving %s: %s/health does not answer 200", replica.key, replica.url)
            self._fail(replica, "its /health does not answer 200")
        elif replica.status is ServingStatus.READY:
            reason = self._unhealthy_reason(replica, health)
            if reason is not None:  # ours, and broken: stop it; the next request starts a new one
                self._fail(replica, reason, tail=True)
                self._stop_later(replica)
        elif replica.owned and self._start_overdue(replica):
            self._fail(replica, f"not healthy after {START_DEADLINE_S:.0f} s", tail=True)
            self._stop_later(replica)

    def _stop_later(self, replica: ServingReplica) -> None:
        """Stop a replica's process without holding up the monitor (caller holds the lock)."""
        self._stoppers = [t for t in self._stoppers if t.is_alive()]
        self._stoppers.append(stop_in_background(replica.process, self._stop_timeout))

    def _unhealthy_reason(self, replica: ServingReplica, health: Health) -> str | None:
        """Why a ready process of ours is to be stopped now, or None to give it more time."""
        if health is Health.UNHEALTHY:
            return "its engine stopped (/health answered an error)"
        now = time.monotonic()
        if replica.silent_since is None:
            replica.silent_since = now
        limit = self.settings.serving_unresponsive_seconds
        return f"did not answer /health for {limit:.0f} s" if now - replica.silent_since >= limit else None

    def _fail(self, replica: ServingReplica, reason: str, *, tail: bool = False) -> None:
        """`reason` is shown to tenants (errors, events): never a path, URL or log line of the shared
        process; the log tail goes to the operator's log instead."""
        if tail:
            log.warning(
                "serving %s replica %d failed: %s; %s", replica.key, replica.index, reason, _tail(replica)
            )
        replica.error = reason
        replica.failed_at = time.monotonic()
        replica.warmed.clear()
        replica.record(ServingStatus.FAILED, "Failed", reason)

    @staticmethod
    def _start_overdue(replica: ServingReplica) -> bool:
        overdue = time.monotonic() - replica.started_at > START_DEADLINE_S
        return replica.status is ServingStatus.INITIALIZING and overdue

    def _warm(self, group: ServingGroup) -> None:
        """Load preloaded adapters with a one-token request each, in the tenant they belong to, on the
        replica routing sends that tenant's requests for the adapter to."""
        pending: list[tuple[tuple[str, str], ServingReplica]] = []
        with self._lock:
            ready = group.ready()
            names, idle = [replica.name for replica in ready], [0] * len(ready)
            for pair in sorted(group.warmups) if ready else []:
                target = ready[routing.choose(routing.route_key(*pair), names, idle)[0]]
                if pair not in target.warmed:
                    target.warmed.add(pair)
                    pending.append((pair, target))
        for (tenant, adapter_id), target in pending:
            self._preload(target, tenant, adapter_id)

    def _preload(self, replica: ServingReplica, tenant: str, adapter_id: str) -> None:
        body = {"inputs": WARMUP_PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": 1}}
        content, url = json.dumps(body).encode(), f"{replica.url}/generate"
        headers = self.signed_headers(tenant, "POST", url, content) | {"Content-Type": "application/json"}
        try:
            response = httpx.post(url, content=content, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            log.warning("preloading %s for tenant %s failed: %s", adapter_id, tenant, exc)
            return
        if response.status_code != 200:
            log.warning("preloading %s for tenant %s failed: %s", adapter_id, tenant, response.text[:300])


def _tail(replica: ServingReplica) -> str:
    if replica.log_path is None or not replica.log_path.exists():
        return "no log"
    lines = replica.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return f"last lines of {replica.log_path}:\n" + "\n".join(lines)
