"""The control plane's command handlers, `tuneforge up | token | migrate | gc`: run the embedded stack
(its worker as a `tuneforge worker` child process), mint, list and revoke API tokens, migrate the
database, remove orphaned blobs."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tuneforge.cli.tables import table

from app.context import AppContext
from app.db import migrate
from app.db.session import make_engine, make_session_factory, transaction
from app.services import auth, gc
from app.settings import Settings
from app.supervision.child_processes import dies_with_parent

# The worker nodes `tuneforge worker` can run: training jobs, and dataset validation beside them.
WORKER_QUEUES = ("train", "validate")


def server_settings(data_dir: str | None = None) -> Settings:
    if data_dir:
        os.environ["TUNEFORGE_DATA_DIR"] = data_dir
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    print(f"database at head: {_redact(settings.database_url)}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    token = _mint_token(settings, args.tenant, args.user, args.name, args.expires_in)
    print(token)
    lifetime = f"expires in {args.expires_in}" if args.expires_in else "does not expire"
    print(
        f"# token for user {args.user!r} in tenant {args.tenant!r} ({lifetime}); it is shown only once",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            rows = [
                (row.lookup_id, row.user.tenant.name, row.user.username, row.name, auth.token_state(row),
                 row.created_at, row.last_used_at, row.expires_at)
                for row in auth.list_tokens(session, args.tenant)
            ]  # fmt: skip
    finally:
        engine.dispose()
    headers = ("id", "tenant", "user", "name", "state", "created", "last used", "expires")
    print(table(headers, rows))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            row = auth.revoke_token(session, args.token_id)
            print(f"revoked token {row.lookup_id} of user {row.user.username!r} in {row.user.tenant.name!r}")
    finally:
        engine.dispose()
    return 0


def _mint_token(
    settings: Settings, tenant: str, user: str, name: str = "", expires_in: timedelta | None = None
) -> str:
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            owner = auth.get_or_create_user(session, tenant, user)
            return auth.create_token(session, owner, name, expires_in=expires_in)
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

    settings = server_settings(args.data_dir)
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
    app = create_app(settings)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=UP_GRACEFUL_SHUTDOWN_S,
        )
    finally:
        # The app's shutdown stops its serving processes too; this is for when stopping never got there.
        app.state.serving.close()
        if worker is not None:
            _stop_worker_process(worker)
    return 0


# Open streams (a proxied generation can run for minutes) are cut after this long when `up` stops.
UP_GRACEFUL_SHUTDOWN_S = 5


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
    command = [sys.executable, "-m", "tuneforge.cli", "worker", "--queues", ",".join(queues)]
    # Killed outright, `up` cannot stop it: the kernel then sends it Celery's cold shutdown (a job in
    # flight resumes from its last checkpoint on the next start).
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=dies_with_parent(signal.SIGQUIT),
    )
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


def cmd_gc(args: argparse.Namespace) -> int:
    settings = server_settings(args.data_dir)
    min_age = settings.gc_min_age_seconds if args.min_age_seconds is None else args.min_age_seconds
    if min_age < 0:
        raise ValueError(f"--min-age-seconds: must be at least 0, got {min_age:g}")
    ctx = AppContext.from_settings(settings)
    try:
        with ctx.sessions() as session:
            report = gc.collect(
                ctx.store,
                session,
                min_age=timedelta(seconds=min_age),
                dry_run=args.dry_run,
                upload_token_ttl=timedelta(seconds=settings.signed_url_ttl_seconds),
            )
    finally:
        ctx.close()
    _print_gc_report(report, min_age)
    return 0


def _print_gc_report(report: gc.GcReport, min_age: float) -> None:
    verb, freed = ("would remove", "would free") if report.dry_run else ("removed", "freed")
    for orphan in report.removable:
        print(
            f"{verb} {orphan.prefix}  {len(orphan.blobs)} blob(s), {orphan.size} bytes, "
            f"last written {orphan.newest.isoformat(timespec='seconds')}"
        )
    summary = (
        f"gc: {verb} {len(report.removable)} orphan(s), {report.freed_blobs} blob(s); {freed} "
        f"{report.freed_bytes} bytes ({_human(report.freed_bytes)}); kept {len(report.too_recent)} "
        f"unreferenced owner(s) written in the last {min_age:g} s"
    )
    print(summary + (" (dry run: nothing removed)" if report.dry_run else ""))


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}" if at else url
