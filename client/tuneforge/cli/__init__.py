"""The `tuneforge` command: drive a server over HTTP, plus whatever commands installed distributions add.

The remote commands (`datasets`, `repos`, `adapters`, `jobs`, `deployments`, `prompt`) live in
`remote_commands` and talk to a server only through the thin client, so `pip install tuneforge-client`
alone gives a working remote CLI. The server distribution adds `up`, `worker`, `serve`, `token`,
`migrate` and `gc` to the same command through the `tuneforge.commands` entry-point group (`plugins`).

Exit codes: 0 success, 1 a user error (one line on stderr), 2 a server or backing service out of reach.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tuneforge.cli.plugins import CommandPlugin, installed_plugins
from tuneforge.cli.remote_parser import add_remote_commands
from tuneforge.errors import ServerUnreachableError, TuneforgeError

__all__ = ["build_parser", "main"]

REMOTE_SUMMARY = "(datasets, repos, adapters, jobs, deployments, prompt)"
EXIT_CODES = "Exit codes: 0 success, 1 user error, 2 server unreachable."
EXIT_USER_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def build_parser(plugins: Sequence[CommandPlugin] | None = None) -> argparse.ArgumentParser:
    """The whole command line: the installed plugins' commands first, then the remote ones."""
    plugins = installed_plugins() if plugins is None else plugins
    parser = argparse.ArgumentParser(prog="tuneforge", description=_description(plugins))
    parser.add_argument("--data-dir", help="overrides TUNEFORGE_DATA_DIR")
    commands = parser.add_subparsers(dest="command", required=True)
    for plugin in plugins:
        plugin.add_commands(commands)
    add_remote_commands(commands)
    return parser


def _description(plugins: Sequence[CommandPlugin]) -> str:
    if not plugins:
        return f"Drive a tuneforge server over HTTP {REMOTE_SUMMARY}. {EXIT_CODES}"
    summaries = " or ".join(plugin.SUMMARY for plugin in plugins)
    return f"{summaries[:1].upper()}{summaries[1:]} or drive one over HTTP {REMOTE_SUMMARY}. {EXIT_CODES}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    # Before logging is set up: what the plugins log while they are imported is not the command's output.
    plugins = installed_plugins()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per HTTP request would bury the remote commands' output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser(plugins).parse_args(argv)
    args.data_dir = getattr(args, "data_dir", None)
    try:
        return int(args.func(args))
    except ServerUnreachableError as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except (TuneforgeError, ValueError, OSError) as exc:
        # OSError: a local file that is missing or unreadable, a port already taken.
        return _fail(str(exc), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # what was interrupted has said what it left behind
    except Exception as exc:
        # A plugin's own errors (the server's service and backing-service errors) in one line too.
        for plugin in plugins:
            failure = plugin.failure(exc)
            if failure is not None:
                return _fail(*failure)
        raise


def _fail(message: str, code: int) -> int:
    # One line: a multi-line server message is folded so scripts can read the reason from stderr.
    print(f"tuneforge: error: {' '.join(message.split())}", file=sys.stderr)
    return code
