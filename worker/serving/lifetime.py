"""How a serving process stops: on SIGTERM or Ctrl-C within a bounded time, when its engine thread
dies, and when the process that started it is gone.

A process whose engine died must not linger answering 503 (its supervisor restarts what exits), one
that was asked to stop must not wait on streams that may run for minutes, and one whose parent was
killed must not hold its GPU or gigabytes of weights as an orphan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    import socket

    from starlette.types import ASGIApp

    from worker.serving.engine_api import ServingEngine

log = logging.getLogger(__name__)

# In-flight requests are failed with ShuttingDownError as soon as stopping begins; this only bounds
# how long uvicorn then waits for their connections to close.
GRACEFUL_SHUTDOWN_S = 5.0
# Should stopping itself hang (a wedged step holding the interpreter, a stuck lifespan), exit anyway.
HARD_EXIT_AFTER_S = 30.0
EXIT_ENGINE_DIED = 3
EXIT_PARENT_GONE = 4


class ServingServer(uvicorn.Server):
    """uvicorn's server over one engine: stopping fails the engine's requests first (streams end now,
    not when their last token would have come), and is bounded in time."""

    def __init__(
        self, config: uvicorn.Config, engine: ServingEngine, *, hard_exit_after_s: float | None = None
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.exit_code = 0
        self.hard_exit_after_s = hard_exit_after_s  # None in tests: they run the server in a thread
        self._hard_exit: threading.Timer | None = None
        engine.on_death = self.engine_died

    def engine_died(self) -> None:
        """Called on the engine thread as it ends: stop, and exit non-zero so the supervisor restarts us."""
        self.stop(EXIT_ENGINE_DIED)

    def stop(self, exit_code: int = 0) -> None:
        """Begin stopping from any thread (uvicorn's loop notices `should_exit` within 0.1 s)."""
        if exit_code and not self.exit_code:
            self.exit_code = exit_code
        self.should_exit = True
        self._arm_hard_exit()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.begin_shutdown()
        self._arm_hard_exit()
        await super().shutdown(sockets)

    def _arm_hard_exit(self) -> None:
        if self.hard_exit_after_s is None or self._hard_exit is not None:
            return
        code = self.exit_code or 1

        def exit_now() -> None:
            log.critical("the server did not stop within %.0f s; exiting now", self.hard_exit_after_s)
            os._exit(code)

        self._hard_exit = threading.Timer(self.hard_exit_after_s, exit_now)
        self._hard_exit.daemon = True
        self._hard_exit.start()


def process_server(
    app: ASGIApp, engine: ServingEngine, *, host: str, port: int, log_level: str, parent_pid: int | None
) -> ServingServer:
    """The server of a `tuneforge serve` process: graceful shutdown bounded, a hard exit should stopping
    hang, and (with `parent_pid`) a stop once the process that started it is gone."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S)
    )
    server = ServingServer(config, engine, hard_exit_after_s=HARD_EXIT_AFTER_S)
    if parent_pid is not None:
        watch_parent(parent_pid, lambda: server.stop(EXIT_PARENT_GONE))
    return server


def watch_parent(pid: int, on_gone: Callable[[], None]) -> None:
    """Calls `on_gone` once process `pid`, which started this one, has exited (even by SIGKILL).

    A pidfd becomes readable when the process ends; where there is none (kernels before 5.3) the parent
    id is checked once a second instead. Unlike PR_SET_PDEATHSIG, which fires when the *thread* that
    started the child ends, this follows the process: the control plane starts serving processes from
    pool threads that come and go.
    """
    fd = None
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)
    if os.getppid() != pid:  # gone already (this process was handed to init), or never ours
        if fd is not None:
            os.close(fd)
        on_gone()
        return

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
            os.close(fd)
        else:
            while os.getppid() == pid:
                time.sleep(1.0)
        log.warning("the process that started this server (pid %d) is gone; stopping", pid)
        on_gone()

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()
