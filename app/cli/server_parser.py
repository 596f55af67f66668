"""The server commands' arguments: `up`, `worker`, `serve`, `token create|list|revoke`, `migrate`, `gc`."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from app.cli import server_commands as sc
from app.services import auth
from app.settings import MAX_LORA_RANK_LIMIT

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DATA_DIR_HELP = "overrides TUNEFORGE_DATA_DIR"


def add_server_commands(commands: Commands) -> None:
    """Register the commands that run or administer a server on this machine."""
    for add in (_up, _worker, _serve, _token, _migrate, _gc):
        add(commands)


def _data_dir(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given before the command (`tuneforge --data-dir D up`) is not overwritten.
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help=DATA_DIR_HELP)


def _up(commands: Commands) -> None:
    up = commands.add_parser("up", help="run the embedded control plane (SQLite + local blobs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    _data_dir(up)
    up.add_argument("--log-level", default="info")
    up.add_argument(
        "--no-worker", action="store_true", help="run the control plane without a training worker"
    )
    up.set_defaults(func=sc.cmd_up)


def _worker(commands: Commands) -> None:
    worker = commands.add_parser(
        "worker", help="run a training worker (needs the `worker` extra: torch, ...) and a dataset validator"
    )
    worker.add_argument(
        "--queues",
        type=_queues,
        default=sc.WORKER_QUEUES,
        help="train, validate or both (default): `validate` alone needs no torch, e.g. in the API image",
    )
    _data_dir(worker)
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=sc.cmd_worker)


def _serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve one base model and its adapters over HTTP (OpenAI and LoRAX APIs; `worker` extra)",
    )
    serve.add_argument(
        "--base-model", required=True, help="a built-in name, HF id in the cache, or local dir"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, required=True)
    _engine_options(serve)
    serve.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        metavar="PID",
        help="stop when process PID ends (the control plane passes its own, so that its serving processes "
        "never outlive it)",
    )
    serve.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    serve.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    _adapter_options(serve)
    _data_dir(serve)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=sc.cmd_serve)


def _engine_options(serve: argparse.ArgumentParser) -> None:
    """How much the engine holds and batches, and when Turbo adapters speculate."""
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
    serve.add_argument(
        "--max-lora-rank",
        type=_lora_rank,
        default=None,
        metavar="R",
        help="adapters of a higher rank are refused at load (default: TUNEFORGE_MAX_LORA_RANK, 512)",
    )


def _adapter_options(serve: argparse.ArgumentParser) -> None:
    """Which adapters are loaded up front, where they come from, and whose they are."""
    serve.add_argument(
        "--preload", nargs="+", action="extend", default=[], metavar="ID", help="adapters to load at start"
    )
    serve.add_argument(
        "--adapter-dir", help="serve adapters from <dir>/<repo>/<N> instead of tuneforge storage"
    )
    serve.add_argument(
        "--tenant", help="the tenant adapters resolve in when a request names none (default: dev)"
    )


def _token(commands: Commands) -> None:
    token = commands.add_parser("token", help="manage API tokens").add_subparsers(
        dest="action", required=True
    )
    create = token.add_parser("create", help="mint a token for a user (tenant and user are created if new)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--user", default="admin")
    create.add_argument("--name", default="", help="a label for the token")
    create.add_argument(
        "--expires-in",
        type=duration,
        default=None,
        metavar="DURATION",
        help="refuse the token after this long: 90m, 12h, 30d, 2w (5 minutes to 366 days; default: never)",
    )
    _data_dir(create)
    create.set_defaults(func=sc.cmd_token_create)
    listing = token.add_parser("list", help="list tokens: id, owner, state, last use, expiry (never secrets)")
    listing.add_argument("--tenant", help="only this tenant's tokens")
    _data_dir(listing)
    listing.set_defaults(func=sc.cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token now: every later request with it is refused")
    revoke.add_argument("token_id", metavar="ID", help="the id `token list` shows (or the whole token)")
    _data_dir(revoke)
    revoke.set_defaults(func=sc.cmd_token_revoke)


def _migrate(commands: Commands) -> None:
    migrate_cmd = commands.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate_cmd.set_defaults(func=sc.cmd_migrate)


def _gc(commands: Commands) -> None:
    gc_cmd = commands.add_parser(
        "gc",
        help="remove blobs no dataset, adapter version or checkpoint points at (abandoned uploads, "
        "leftovers of deletes) and report the bytes freed",
    )
    gc_cmd.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")
    gc_cmd.add_argument(
        "--min-age-seconds",
        type=float,
        default=None,
        help="only remove orphans whose newest blob is older than this "
        "(default: TUNEFORGE_GC_MIN_AGE_SECONDS, one day)",
    )
    _data_dir(gc_cmd)
    gc_cmd.set_defaults(func=sc.cmd_gc)


# --- argument types -------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """`90m`, `12h`, `30d`, `2w` → a timedelta; the bounds are the token service's."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m or 2w")
    lifetime = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    if not auth.MIN_TOKEN_LIFETIME <= lifetime <= auth.MAX_TOKEN_LIFETIME:
        raise argparse.ArgumentTypeError(f"{text}: a token lives between {auth.LIFETIME_BOUNDS}")
    return lifetime


def _queues(value: str) -> tuple[str, ...]:
    """`train`, `validate` or `train,validate`: the worker nodes to run."""
    chosen = tuple(dict.fromkeys(q.strip() for q in value.split(",") if q.strip()))
    unknown = [q for q in chosen if q not in sc.WORKER_QUEUES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"{value!r}: name one or both of {', '.join(sc.WORKER_QUEUES)}, separated by a comma"
        )
    return chosen


def _lora_rank(value: str) -> int:  # argparse names a type by its function: "invalid _lora_rank value"
    rank = int(value)
    if not 1 <= rank <= MAX_LORA_RANK_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_LORA_RANK_LIMIT}")
    return rank
