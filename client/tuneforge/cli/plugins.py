"""Commands another installed distribution adds to `tuneforge`, found through the `tuneforge.commands`
entry-point group (the server distribution adds `up`, `worker`, `serve`, `token`, `migrate`, `gc`).

An entry point names a module or object with `SUMMARY`, `add_commands` and `failure` (see
`CommandPlugin`); the client itself imports nothing of whoever provides it.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

ENTRY_POINT_GROUP = "tuneforge.commands"


class CommandPlugin(Protocol):
    """What an entry point of the group provides."""

    # What its commands do, for `tuneforge --help`: "run a tuneforge server on this machine (up, ...)".
    SUMMARY: str

    def add_commands(self, commands: Commands) -> None:
        """Register its subcommands; each sets `func(args) -> exit code` as the remote ones do."""

    def failure(self, exc: Exception) -> tuple[str, int] | None:
        """How to report an error of its own that the CLI does not know (the message and exit code),
        or None for one it does not know either."""


def installed_plugins() -> list[CommandPlugin]:
    """Every installed provider of commands, in the order of their entry-point names."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda entry: entry.name)
    return [cast(CommandPlugin, entry.load()) for entry in found]
