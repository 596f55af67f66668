"""`tuneforge up | worker | serve | token | migrate`: run the embedded stack or a worker, mint API tokens,
migrate the database.

`worker` and `serve` import the data plane lazily, so the control-plane image (no torch) can still
run every other command, and `worker --queues validate` too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.db import migrate
from app.db.session import make_engine, make_session_factory, transaction
from app.services import auth
from app.settings import Settings

# The worker nodes `tuneforge worker` can run: training jobs, and dataset validation beside them.
WORKER_QUEUES = ("train", "validate")


def _settings(data_dir: str | None = None) -> Settings:
    if data_dir:
        os.environ["TUNEFORGE_DATA_DIR"] = data_dir
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    print(f"database at head: {_redact(settings.database_url)}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    token = _mint_token(settings, args.tenant, args.user, args.name)
    print(token)
    print(f"# token for user {args.user!r} in tenant {args.tenant!r}; it is shown only once", file=sys.stderr)
    return 0


def _mint_token(settings: Settings, tenant: str, user: str, name: str = "") -> str:
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            return auth.create_token(session, auth.get_or_create_user(session, tenant, user), name)
    finally:
        engine.dispose()


def dev_token(settings: Settings) -> str:
    """The embedded default's token: reused across restarts, re-minted if it no longer verifies."""
    path = settings.dev_token_file
    if path.exists():
        token = path.read_text().strip()
        engine = make_engine(settings.database_url)
        try:
            with transaction(make_session_factory(engine)) as session:
                if auth.is_valid_token(session, token):
                    return token
        finally:
            engine.dispose()
    token = _mint_token(settings, settings.dev_tenant, "admin", "embedded-dev")
    _write_private(path, token)
    return token


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = _settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    token = dev_token(settings) if settings.environment == "development" else None
    url = f"http://{args.host}:{args.port}"
    print(f"tuneforge control plane on {url}  (API docs: {url}/docs)", flush=True)
    print(f"data dir: {settings.data_dir}", flush=True)
    if token:
        print(f"development tenant {settings.dev_tenant!r}, API token: {token}", flush=True)
        print(f"  export PREDIBASE_GATEWAY={url} PREDIBASE_API_TOKEN={token}", flush=True)
    # --no-worker still validates datasets: the validate node is light (no torch) and every upload needs it.
    worker = _start_worker_process(settings, ("validate",) if args.no_worker else WORKER_QUEUES)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that
    # would kill this process before `finally` stops the worker, orphaning it. Exit cleanly instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if worker is not None:
            _stop_worker_process(worker)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


# How long a stopping worker may take to checkpoint-free exit before it is killed; its job resumes
# from the last checkpoint on the next start either way.
WORKER_STOP_TIMEOUT_S = 10.0


def _start_worker_process(settings: Settings, queues: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """`tuneforge worker` beside the control plane, in a session of its own so that Ctrl-C stops it once.

    Its validate node is a child of its own, in the same process group: stopping the group stops both.
    """
    env = os.environ | {"TUNEFORGE_DATA_DIR": str(settings.data_dir)}
    command = [sys.executable, "-m", "app.cli", "worker", "--queues", ",".join(queues)]
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    kind = "training worker" if "train" in queues else "dataset validation worker"
    print(f"{kind} started (pid {process.pid}, broker {_redact(settings.broker_url)})", flush=True)
    return process


def _stop_worker_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # SIGQUIT is Celery's cold shutdown: stop now rather than train the current job to its end.
    os.killpg(process.pid, signal.SIGQUIT)
    try:
        process.wait(timeout=WORKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker  # light: the training stack loads only where it trains

    if "train" in args.queues and importlib.util.find_spec("torch") is None:
        raise ValueError(
            "the training worker needs the data-plane packages (torch is missing): pip install "
            "'tuneforge[worker]', or run only dataset validation with `tuneforge worker --queues validate`"
        )
    settings = _settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    run_worker(settings, queues=args.queues, loglevel=args.log_level)
    return 0


def _queues(value: str) -> tuple[str, ...]:
    queues = tuple(dict.fromkeys(q.strip() for q in value.split(",") if q.strip()))
    unknown = [q for q in queues if q not in WORKER_QUEUES]
    if not queues or unknown:
        raise argparse.ArgumentTypeError(
            f"{value!r}: name one or both of {', '.join(WORKER_QUEUES)}, separated by a comma"
        )
    return queues


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from worker.serve_main import run_server
    except ImportError as exc:
        raise ValueError(
            f"serving needs the data-plane packages ({exc.name} is missing): pip install 'tuneforge[worker]'"
        ) from None

    settings = _settings(args.data_dir)
    run_server(
        settings,
        base_model=args.base_model,
        host=args.host,
        port=args.port,
        max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size,
        kv_cache_bytes=args.kv_cache_bytes,
        speculation_max_batch=args.speculation_max_batch,
        speculation_depth=args.speculation_depth,
        dtype=args.dtype,
        device=args.device,
        preload=args.preload,
        adapter_dir=Path(args.adapter_dir) if args.adapter_dir else None,
        tenant=args.tenant,
        log_level=args.log_level,
    )
    return 0


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}" if at else url


def add_server_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the commands that run or administer a server on this machine."""

    up = commands.add_parser("up", help="run the embedded control plane (SQLite + local blobs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default=argparse.SUPPRESS, help="overrides TUNEFORGE_DATA_DIR")
    up.add_argument("--log-level", default="info")
    up.add_argument(
        "--no-worker", action="store_true", help="run the control plane without a training worker"
    )
    up.set_defaults(func=cmd_up)

    worker = commands.add_parser(
        "worker", help="run a training worker (needs the `worker` extra: torch, ...) and a dataset validator"
    )
    worker.add_argument(
        "--queues",
        type=_queues,
        default=WORKER_QUEUES,
        help="train, validate or both (default): `validate` alone needs no torch, e.g. in the API image",
    )
    worker.add_argument("--data-dir", default=argparse.SUPPRESS, help="overrides TUNEFORGE_DATA_DIR")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=cmd_worker)

    serve = commands.add_parser(
        "serve",
        help="serve one base model and its adapters over HTTP (OpenAI and LoRAX APIs; `worker` extra)",
    )
    serve.add_argument(
        "--base-model", required=True, help="a built-in name, HF id in the cache, or local dir"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--max-adapters", type=int, default=16, help="adapters kept in memory (LRU)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    serve.add_argument(
        "--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes (default: 1 GiB)"
    )
    serve.add_argument(
        "--speculation-max-batch",
        type=int,
        default=None,
        metavar="N",
        help="Turbo adapters draft and verify only while at most N sequences decode together "
        "(default: 2 on the CPU, 16 on a GPU)",
    )
    serve.add_argument(
        "--speculation-depth",
        type=int,
        default=None,
        metavar="K",
        help="at most K drafts a step (default: each Turbo adapter's trained depth)",
    )
    serve.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    serve.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    serve.add_argument(
        "--preload", nargs="+", action="extend", default=[], metavar="ID", help="adapters to load at start"
    )
    serve.add_argument(
        "--adapter-dir", help="serve adapters from <dir>/<repo>/<N> instead of tuneforge storage"
    )
    serve.add_argument(
        "--tenant", help="the tenant adapters resolve in when a request names none (default: dev)"
    )
    serve.add_argument("--data-dir", default=argparse.SUPPRESS, help="overrides TUNEFORGE_DATA_DIR")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    token = commands.add_parser("token", help="manage API tokens").add_subparsers(
        dest="action", required=True
    )
    create = token.add_parser("create", help="mint a token for a user (tenant and user are created if new)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--user", default="admin")
    create.add_argument("--name", default="", help="a label for the token")
    create.set_defaults(func=cmd_token_create)

    migrate_cmd = commands.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate_cmd.set_defaults(func=cmd_migrate)
