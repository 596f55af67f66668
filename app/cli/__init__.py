"""The control plane's part of the `tuneforge` command: `up`, `token`, `migrate`, `gc` and `models`, run
against a server on this machine (the data plane's `worker` and `serve` are `worker/commands.py`'s).

The command itself is the client distribution's (`tuneforge.cli`); this package is its
`tuneforge.commands` entry point (see `tuneforge.cli.plugins`), so one `tuneforge` runs these beside
the remote commands. Nothing here imports the data plane: `app` never imports `worker`.
"""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError
from tuneforge.cli import EXIT_UNREACHABLE, EXIT_USER_ERROR

from app.cli.server_parser import add_server_commands as add_commands
from app.errors import ServiceError
from app.services.model_store import HubUnreachableError
from app.storage import StorageError

__all__ = ["SUMMARY", "add_commands", "failure"]

SUMMARY = "run a tuneforge server on this machine (up, token, migrate, gc, models)"


def failure(exc: Exception) -> tuple[str, int] | None:
    """The server's own errors as the CLI reports them: a service's refusal is the user's to fix; an
    unreachable database or blob store is named in one line instead of a traceback."""
    if isinstance(exc, HubUnreachableError):  # `models pull` on a machine without the hub
        return str(exc), EXIT_UNREACHABLE
    if isinstance(exc, ServiceError):
        return str(exc), EXIT_USER_ERROR
    if isinstance(exc, SQLAlchemyError | StorageError):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot reach a backing service: {first_line}", EXIT_UNREACHABLE
    return None
