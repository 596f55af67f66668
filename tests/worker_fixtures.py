"""Real training workers for end-to-end tests: `tuneforge worker` subprocesses beside a live server.

A worker here is exactly what production runs (a Celery worker process with its prefork child),
configured through the same TUNEFORGE_* environment variables, so killing it is a real crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from live_server import LiveServer
from tests_support import POSTGRES_ADMIN_DSN

from app.supervision.serving_processes import settings_environment

REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/0")
WORKER_START_TIMEOUT_S = 120.0
# Short enough that a crash test waits seconds for the sweeper, long enough to ride out a slow step.
TEST_LEASE_SECONDS = 4.0


def settings_env(settings: Any) -> dict[str, str]:
    """The environment that makes a child process build exactly these Settings, offline."""
    return settings_environment(settings) | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class WorkerProcess:
    """One `tuneforge worker`; its log goes to a file the test can show when something fails.

    By default it runs both nodes (training, and validation as its child); `queues="validate"`
    runs only the light validate node, what the API tests need to see datasets connected.
    """

    def __init__(self, settings: Any, log_path: Path, queues: str | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        queues = ["--queues", self.queues] if self.queues else []
        nodes = 1 if self.queues and "," not in self.queues else 2
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.cli", "worker", *queues, "--log-level", "info"],
                env=settings_env(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches the pool child too
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while self.log_path.read_bytes()[offset:].count(b" ready.") < nodes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"worker did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool child at once: a crash, with no chance to clean up."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop_all([self])

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def stop_all(workers: list[WorkerProcess]) -> None:
    """Cold shutdown for all at once (tests do not wait for a job), then SIGKILL any still running."""
    running = [w.process for w in workers if w.process is not None and w.process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGQUIT)
    deadline = time.monotonic() + 15
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class WorkerStack:
    """A live control plane plus its workers, on one configuration."""

    server: Any  # tests/conftest.py LiveServer
    settings: Any
    workers: list[WorkerProcess]
    new_worker: Callable[..., WorkerProcess]  # (queues=None): both nodes; "validate": validation only

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def app(self) -> Any:
        return self.server.app

    def mint_token(self, tenant: str, user: str = "alice") -> str:
        return str(self.server.mint_token(tenant, user))


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} for the worker tests: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def validate_worker_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Any], WorkerProcess]]:
    """Starts (once per Settings) a real `tuneforge worker --queues validate` for a stack's datasets.

    Validation never runs in the API process: a test that waits for `connected` needs one of these
    on the same database, blob store and broker as its app.
    """
    started: dict[str, WorkerProcess] = {}

    def start(settings: Any) -> WorkerProcess:
        key = " ".join(
            (settings.database_url, settings.storage_url, settings.broker_url, settings.validate_queue)
        )
        if key not in started:
            logs = tmp_path_factory.mktemp("validate-worker")
            started[key] = WorkerProcess(settings, logs / "worker.log", queues="validate").start()
        return started[key]

    yield start
    stop_all(list(started.values()))


@pytest.fixture(scope="session")
def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per run; every worker of every stack reads the same tiny-random-llama checkpoint."""
    from worker.training.base_models import resolve_base_model

    cache = tmp_path_factory.mktemp("worker-models")
    resolve_base_model("tiny-random-llama", cache)
    return cache


@pytest.fixture(scope="session")
def worker_stack_factory(
    request: pytest.FixtureRequest,
    postgres_url: str,
    s3_server: Any,
    stack_settings_factory: Callable[..., Any],
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., WorkerStack]]:
    """Builds a live server + started worker on a stack; a queue of its own keeps stacks apart.

    Depends on the database and S3 server directly, so that they outlive every server built here.

    `postgres_s3` uses the real Redis as its broker; `embedded` the broker-less SQLite transport.
    """
    opened: list[tuple[LiveServer, list[WorkerProcess]]] = []
    created: list[str] = []

    def build(stack: str, **overrides: Any) -> WorkerStack:
        fields: dict[str, Any] = {
            "train_queue": f"tuneforge.train.test-{secrets.token_hex(4)}",
            "validate_queue": f"tuneforge.validate.test-{secrets.token_hex(4)}",
            "job_lease_seconds": TEST_LEASE_SECONDS,
            "sweep_interval_seconds": 0.5,
            "model_cache_dir": shared_model_cache,
        }
        if stack == "postgres_s3":
            fields["broker_url"] = request.getfixturevalue("redis_url")
            # A database per stack: each control plane's sweeper sends every unsent job it can see.
            fields["database_url"] = _new_database(postgres_url, created)
        settings = stack_settings_factory(stack, **(fields | overrides))
        server = LiveServer(settings).__enter__()
        workers: list[WorkerProcess] = []
        logs = tmp_path_factory.mktemp("worker-logs")

        def new_worker(queues: str | None = None) -> WorkerProcess:
            worker = WorkerProcess(settings, logs / f"worker-{len(workers)}.log", queues=queues)
            workers.append(worker)
            return worker

        opened.append((server, workers))
        return WorkerStack(server=server, settings=settings, workers=workers, new_worker=new_worker)

    yield build
    # All at once: each stack's shutdown is mostly waiting (a worker's cold stop, a serving process's
    # grace period), and the session has a dozen stacks.
    stop_all([worker for _, workers in opened for worker in workers])
    with ThreadPoolExecutor(max_workers=max(1, len(opened))) as pool:
        list(pool.map(lambda server: server.__exit__(None, None, None), [server for server, _ in opened]))
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _new_database(postgres_url: str, created: list[str]) -> str:
    name = f"tuneforge_stack_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    created.append(name)
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session", params=["embedded", "postgres_s3"])
def live_server_with_worker(
    request: pytest.FixtureRequest, worker_stack_factory: Callable[..., WorkerStack]
) -> WorkerStack:
    """A live server with one running worker, per stack, shared by the tests that only train."""
    stack = worker_stack_factory(request.param)
    stack.new_worker().start()
    return stack
