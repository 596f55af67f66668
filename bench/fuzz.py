"""A long fuzz run: the suite's Schemathesis harness (tests/fuzz) with a bigger budget and fresh inputs.

Run: .venv/bin/python bench/fuzz.py [--target control-plane|serving|all] [--stack embedded|postgres_s3]
     [--requests 20000] [--seconds 600] [--seed N]
Each target is fuzzed in passes over every operation (Schemathesis's coverage cases in the first
pass, then generated requests that fit the schema and that do not, undeclared headers, extreme
numbers in accepted bodies) until its request or time budget is spent; it always stops by itself.
Prints requests sent, answers by class (2xx/4xx/5xx/hung), latency, and every 5xx, escaped
exception and hang with the smallest request that caused it. The peer is the suite's own run
(`make test`: about a thousand requests per API, the same examples every time); the ratio printed
is how many more requests this run sent. Exits 1 if anything was found, so it can gate a nightly job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the tiny model is built locally
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz")]

from fuzz_support import Budget, FuzzRun, FuzzTarget, fuzz  # noqa: E402
from fuzz_targets import (  # noqa: E402
    BASE_MODELS,
    TINY,
    ControlPlaneTarget,
    ServingBackend,
    ServingTarget,
    serving_adapter_root,
)
from schemathesis.python import asgi  # noqa: E402
from worker_fixtures import WorkerProcess  # noqa: E402

from app.db import migrate  # noqa: E402
from app.settings import Settings  # noqa: E402
from worker.training.base_models import resolve_base_model  # noqa: E402

# What `make test` sends per API (tests/fuzz), for the ratio.
SUITE_REQUESTS = 1000


@contextlib.contextmanager
def _postgres_s3_fields() -> Iterator[dict[str, object]]:
    """A database of this run's own on the local PostgreSQL and a moto S3 server, both removed after."""
    import boto3
    import psycopg
    from moto.server import ThreadedMotoServer
    from tests_support import POSTGRES_ADMIN_DSN

    for key, value in (("AWS_ACCESS_KEY_ID", "fuzz"), ("AWS_SECRET_ACCESS_KEY", "fuzz")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    name = f"tuneforge_fuzz_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="fuzz")
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield {
            "database_url": f"{base}/{name}",
            "storage_url": "s3://fuzz/tuneforge",
            "s3_endpoint_url": endpoint,
        }
    finally:
        s3.stop()
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(target: FuzzTarget, budget: Budget) -> FuzzRun:
    """Passes over every operation until the budget is spent; coverage cases only in the first."""
    run = FuzzRun()
    while not run.stopped:
        sent = run.sent
        fuzz(target, budget, run)
        budget.coverage_per_operation = 0
        if run.sent == sent:  # nothing left to generate
            break
    return run


def _budget(args: argparse.Namespace, seconds: float) -> Budget:
    return Budget(
        examples_per_operation=args.examples,
        max_requests=args.requests,
        max_seconds=seconds,
        derandomize=False,
        max_restarts=args.max_restarts,
        seed=args.seed,
    )


def _report(name: str, run: FuzzRun) -> bool:
    print(run.summary(name), flush=True)
    print(f"  {run.sent / SUITE_REQUESTS:.1f}x the suite's {SUITE_REQUESTS} requests")
    return not run.findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["control-plane", "serving", "all"], default="all")
    parser.add_argument("--stack", choices=["embedded", "postgres_s3"], default="embedded")
    parser.add_argument("--requests", type=int, default=20_000, help="per target")
    parser.add_argument("--seconds", type=float, default=600.0, help="per target")
    parser.add_argument("--examples", type=int, default=100, help="generated per operation, mode and pass")
    parser.add_argument("--max-restarts", type=int, default=50, help="serving engines restarted after a kill")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed, to repeat a run")
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    args = parser.parse_args()
    model_dir = resolve_base_model(TINY, args.cache_dir)
    clean = True
    with tempfile.TemporaryDirectory(prefix="tuneforge-fuzz-") as scratch:
        adapters = serving_adapter_root(Path(scratch) / "adapters")
        if args.target in ("serving", "all"):
            serving = ServingTarget(model_dir, adapters)
            try:
                clean &= _report("serving", _run(serving, _budget(args, args.seconds)))
            finally:
                serving.close()
        if args.target in ("control-plane", "all"):
            clean &= _fuzz_control_plane(args, model_dir, adapters, Path(scratch))
    return 0 if clean else 1


def _fuzz_control_plane(args: argparse.Namespace, model_dir: Path, adapters: Path, scratch: Path) -> bool:
    secret_key = secrets.token_urlsafe(48)  # the control plane signs what it sends the backend with it
    backend = ServingBackend(model_dir, adapters, secret_key)
    with contextlib.ExitStack() as stack:
        stack.callback(backend.close)
        (scratch / "data").mkdir()
        fields: dict[str, object] = {"data_dir": scratch / "data", "public_url": "", "secret_key": secret_key}
        if args.stack == "postgres_s3":
            fields |= stack.enter_context(_postgres_s3_fields())
        settings = Settings(**fields, serving_urls={m: backend.url for m in BASE_MODELS})  # type: ignore[arg-type]
        migrate.upgrade(settings.database_url)
        # Datasets are validated on a validate worker, as deployed (the seeded one must connect).
        validator = WorkerProcess(settings, scratch / "validate-worker.log", queues="validate").start()
        stack.callback(validator.stop)
        target = ControlPlaneTarget(f"control plane ({args.stack})", settings, scratch / "seed")
        try:
            run = _run(target, _budget(args, args.seconds))
        finally:
            asgi.shutdown_lifespans()
        return _report(target.name, run)


if __name__ == "__main__":
    sys.exit(main())
