"""The control plane's commands' arguments: `up`, `token create|list|revoke`, `migrate`, `gc`, `models
pull|import|list|show|rm` (the data plane adds `worker` and `serve`: `worker/commands.py`)."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from app.cli import model_commands as mc
from app.cli import server_commands as sc
from app.services import auth

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DATA_DIR_HELP = "overrides TUNEFORGE_DATA_DIR"


def add_server_commands(commands: Commands) -> None:
    """Register the commands that run or administer a server on this machine."""
    for add in (_up, _token, _migrate, _gc, _models):
        add(commands)


def data_dir_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given before the command (`tuneforge --data-dir D up`) is not overwritten.
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help=DATA_DIR_HELP)


def _up(commands: Commands) -> None:
    up = commands.add_parser("up", help="run the embedded control plane (SQLite + local blobs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    data_dir_option(up)
    up.add_argument("--log-level", default="info")
    up.add_argument(
        "--no-worker", action="store_true", help="run the control plane without a training worker"
    )
    up.set_defaults(func=sc.cmd_up)


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
    data_dir_option(create)
    create.set_defaults(func=sc.cmd_token_create)
    listing = token.add_parser("list", help="list tokens: id, owner, state, last use, expiry (never secrets)")
    listing.add_argument("--tenant", help="only this tenant's tokens")
    data_dir_option(listing)
    listing.set_defaults(func=sc.cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token now: every later request with it is refused")
    revoke.add_argument("token_id", metavar="ID", help="the id `token list` shows (or the whole token)")
    data_dir_option(revoke)
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
    data_dir_option(gc_cmd)
    gc_cmd.set_defaults(func=sc.cmd_gc)


def _models(commands: Commands) -> None:
    models = commands.add_parser(
        "models",
        help="the model store: base models pulled from the Hugging Face hub or imported from a directory, "
        "which workers and serving processes load",
    ).add_subparsers(dest="action", required=True)
    pull = models.add_parser(
        "pull",
        help="download a hub model (safetensors, config, tokenizer; HF_TOKEN for gated repos) into the store",
    )
    pull.add_argument("name", metavar="ORG/NAME[@REV]", help="a hub repo id, or a Predibase catalogue name")
    pull.add_argument("--replace", action="store_true", help="overwrite the model if it is already stored")
    pull.set_defaults(func=mc.cmd_pull)
    imp = models.add_parser(
        "import", help="copy a Hugging Face-format model directory (safetensors weights) into the store"
    )
    imp.add_argument(
        "directory", metavar="DIR", help="what save_pretrained wrote: config.json, *.safetensors"
    )
    imp.add_argument("--name", required=True, help="the name jobs and deployments will use (a-z, 0-9, . _ -)")
    imp.add_argument("--replace", action="store_true", help="overwrite the model if it is already stored")
    imp.set_defaults(func=mc.cmd_import)
    listing = models.add_parser(
        "list", help="every base model available here: built-ins, the store, the HF cache, local directories"
    )
    listing.set_defaults(func=mc.cmd_list)
    show = models.add_parser("show", help="one available base model in detail")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(func=mc.cmd_show)
    rm = models.add_parser("rm", help="delete a stored model's files and entry")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument(
        "--force", action="store_true", help="remove it even while an active job or a deployment names it"
    )
    rm.set_defaults(func=mc.cmd_rm)
    for parser in (pull, imp, listing, show, rm):
        data_dir_option(parser)


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
