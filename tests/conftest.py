"""Fixtures shared by every test layer: a fresh PostgreSQL database per run, test settings."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from live_server import LiveServer
from tests_support import POSTGRES_ADMIN_DSN, TEST_SECRET_KEY

# Code under test never reaches a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# --- Hypothesis: one profile for every property test ---------------------------------------------
# `tuneforge-ci` (the default): the same examples every run, so a red CI run is red again on a
# laptop and no run turns red for inputs it happened to draw. The seed comes from each test's
# source (derandomize), so no example database is kept or shared between branches. No per-example
# deadline: on a shared 2-core machine timings swing tenfold and a deadline would fail correct
# code; pytest-timeout and the tests' own timeouts bound a hang. 100 examples unless a test asks
# for fewer or more with @settings.
# `tuneforge-explore` (HYPOTHESIS_PROFILE=tuneforge-explore): fresh random inputs every run, with
# the example database keeping whatever failed, for hunting locally or in a nightly job.
settings.register_profile(
    "tuneforge-ci",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "tuneforge-explore",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tuneforge-ci"))

# The S3-compatible server (moto's, over HTTP) is needed by integration and end-to-end tests alike;
# real training workers (subprocesses) by the end-to-end tests that train; small model directories by
# the model store's tests.
pytest_plugins = ["s3_fixtures", "worker_fixtures", "model_dirs"]


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
    """Settings for a named stack; `postgres_s3` pulls in the real PostgreSQL, the S3 server and Redis.

    Queues get names of their own on the shared Redis, so that no other test run's workers take
    this run's messages (nor this run's theirs).
    """
    from app.db import migrate
    from app.settings import Settings

    built: dict[str, Settings] = {}

    def build(stack: str, **overrides: object) -> Settings:
        key = f"{stack}:{sorted(overrides.items())}"
        if key in built:
            return built[key]
        data_dir = tmp_path_factory.mktemp(f"tuneforge-{stack}")
        # The serving processes a stack's control plane starts live until the session ends: 512 MiB of KV
        # cache each (smollm2-135m's whole 8192-token context in fp32 needs 360 MiB), not the default GiB.
        fields: dict[str, object] = {
            "data_dir": data_dir,
            "public_url": "",
            "serving_kv_cache_bytes": 512 << 20,
            # GRPO jobs' rollout engine in the worker: the test stacks train tiny models.
            "worker_rollout_kv_cache_bytes": 128 << 20,
        }
        if stack == "postgres_s3":
            s3 = request.getfixturevalue("s3_server")
            bucket = s3.create_bucket()
            fields.update(
                database_url=request.getfixturevalue("postgres_url"),
                storage_url=f"s3://{bucket}/tuneforge",
                s3_endpoint_url=s3.endpoint_url,
                # Shared database and blob store: the development secret is refused there.
                secret_key=TEST_SECRET_KEY,
                broker_url=request.getfixturevalue("redis_url"),
                train_queue=f"tuneforge.train.test-{secrets.token_hex(4)}",
                validate_queue=f"tuneforge.validate.test-{secrets.token_hex(4)}",
            )
        fields.update(overrides)
        settings = Settings(**fields)  # type: ignore[arg-type]
        migrate.upgrade(settings.database_url)
        built[key] = settings
        return settings

    yield build
    _drop_redis_queues([s for s in built.values() if s.broker_url.startswith("redis://")])


def _drop_redis_queues(stacks: list) -> None:  # type: ignore[type-arg]
    """The run's own queues (a list per queue, and kombu's binding set) leave the shared Redis."""
    import redis

    for stack in stacks:
        client = redis.Redis.from_url(stack.broker_url, socket_connect_timeout=2)
        with contextlib.suppress(redis.RedisError):  # a Redis of a test's own may be gone already
            for queue in (stack.train_queue, stack.validate_queue):
                client.delete(queue, f"_kombu.binding.{queue}")


# --- a live server over real HTTP, for SDK and client tests ------------------------------------------


@pytest.fixture(scope="session", params=STACKS)
def live_server(request: pytest.FixtureRequest, stack_settings_factory, validate_worker_for):  # type: ignore[no-untyped-def]
    """A live server per stack (embedded, Postgres + S3) with a validate worker; a fresh tenant per test."""
    settings = stack_settings_factory(request.param)
    validate_worker_for(settings)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def live_token(live_server: LiveServer) -> str:
    return live_server.mint_token(f"t-{secrets.token_hex(4)}")
