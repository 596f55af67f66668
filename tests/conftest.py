"""Fixtures shared by every test layer: a fresh PostgreSQL database per run, test settings."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest

# Code under test never reaches a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The S3-compatible server (moto's, over HTTP) is needed by integration and end-to-end tests alike;
# real training workers (subprocesses) by the end-to-end tests that train.
pytest_plugins = ["s3_fixtures", "worker_fixtures"]

POSTGRES_ADMIN_DSN = os.environ.get(
    "TUNEFORGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A brand-new database on the machine's real PostgreSQL, dropped after the run.

    A missing server fails the run: integration tests must never silently skip in CI.
    """
    name = f"tuneforge_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_DSN} for integration tests: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """An empty database of its own, for tests that migrate up and down."""
    name = f"tuneforge_mig_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the two configurations every API test runs on ------------------------------------------------

STACKS = ("embedded", "postgres_s3")


@pytest.fixture(scope="session")
def stack_settings_factory(tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """Settings for a named stack; `postgres_s3` pulls in the real PostgreSQL and the S3 server."""
    from app.db import migrate
    from app.settings import Settings

    built: dict[str, Settings] = {}

    def build(stack: str, **overrides: object) -> Settings:
        key = f"{stack}:{sorted(overrides.items())}"
        if key in built:
            return built[key]
        data_dir = tmp_path_factory.mktemp(f"tuneforge-{stack}")
        fields: dict[str, object] = {"data_dir": data_dir, "public_url": ""}
        if stack == "postgres_s3":
            s3 = request.getfixturevalue("s3_server")
            bucket = s3.create_bucket()
            fields.update(
                database_url=request.getfixturevalue("postgres_url"),
                storage_url=f"s3://{bucket}/tuneforge",
                s3_endpoint_url=s3.endpoint_url,
            )
        fields.update(overrides)
        settings = Settings(**fields)  # type: ignore[arg-type]
        migrate.upgrade(settings.database_url)
        built[key] = settings
        return settings

    return build


# --- a live server over real HTTP, for SDK and client tests ------------------------------------------


class LiveServer:
    """The app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: object) -> None:
        import socket
        import threading

        import uvicorn

        from app.main import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)  # type: ignore[arg-type]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def mint_token(self, tenant: str, user: str = "alice") -> str:
        from app.db.session import transaction
        from app.services import auth

        with transaction(self.app.state.ctx.sessions) as session:
            return auth.create_token(session, auth.get_or_create_user(session, tenant, user))


@pytest.fixture(scope="session", params=STACKS)
def live_server(request: pytest.FixtureRequest, stack_settings_factory):  # type: ignore[no-untyped-def]
    """A live server per stack (embedded, Postgres + S3); tests use a fresh tenant each."""
    with LiveServer(stack_settings_factory(request.param)) as server:
        yield server


@pytest.fixture
def live_token(live_server: LiveServer) -> str:
    return live_server.mint_token(f"t-{secrets.token_hex(4)}")
