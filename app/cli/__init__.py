"""The `tuneforge` command: run and administer a server here, or drive one over HTTP.

Server commands (`up`, `worker`, `serve`, `token`, `migrate`, `gc`) live in `server_commands`; the remote
ones (`datasets`, `repos`, `adapters`, `jobs`, `deployments`, `prompt`) in `remote_commands` and talk
to a server only through the thin client. Nothing here imports torch at module level, so the
control-plane image runs every command but `worker` and `serve`.

Exit codes: 0 success, 1 a user error (one line on stderr), 2 a server or backing service out of reach.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError
from tuneforge import ServerUnreachableError, TuneforgeError

from app.cli.remote_parser import add_remote_commands
from app.cli.server_commands import add_server_commands, cmd_serve, dev_token
from app.errors import ServiceError
from app.storage import StorageError

__all__ = ["build_parser", "cmd_serve", "dev_token", "main"]

DESCRIPTION = (
    "Run a tuneforge server on this machine (up, worker, serve, token, migrate, gc) or drive one over HTTP "
    "(datasets, repos, adapters, jobs, deployments, prompt). Exit codes: 0 success, 1 user error, "
    "2 server unreachable."
)
EXIT_USER_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: server commands first, then the remote ones."""
    parser = argparse.ArgumentParser(prog="tuneforge", description=DESCRIPTION)
    parser.add_argument("--data-dir", help="overrides TUNEFORGE_DATA_DIR")
    commands = parser.add_subparsers(dest="command", required=True)
    add_server_commands(commands)
    add_remote_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per HTTP request would bury the remote commands' output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    args.data_dir = getattr(args, "data_dir", None)
    try:
        return int(args.func(args))
    except ServerUnreachableError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except (TuneforgeError, ServiceError, ValueError, OSError) as exc:
        # OSError: a local file that is missing or unreadable, a port already taken.
        return _fail(str(exc), EXIT_USER_ERROR)
    except (SQLAlchemyError, StorageError) as exc:
        # Unreachable database or blob store: say which, in one line, instead of a traceback.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"cannot reach a backing service: {first_line}", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # what was interrupted has said what it left behind


def _fail(message: str, code: int) -> int:
    # One line: a multi-line server message is folded so scripts can read the reason from stderr.
    print(f"tuneforge: error: {' '.join(message.split())}", file=sys.stderr)
    return code
