"""One reward sandbox process: start it under bubblewrap, exchange JSON lines under deadlines, kill it.

Everything the process sends is hostile: replies are bounded in size, parsed strictly, and a reply
that breaks the protocol ends the process like a hang does. Killing targets the sandbox's pid-1
(bwrap reports its pid), which takes every process in the sandbox's pid namespace with it.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import IO, Any

# A reply is a score or a short error message: anything longer is not a reply.
MAX_REPLY_BYTES = 4096
MAX_STDERR_BYTES = 2000
DIED = "the sandbox process died (memory or CPU limit, or the function ended it)"


class SandboxStartError(Exception):
    """bubblewrap could not create the sandbox: the worker's fault, never the function's."""


class SetupFailed(Exception):
    """The sandbox started but the function could not be defined in it (raised, hung, crashed)."""


class _Died(Exception):
    pass


class SandboxProcess:
    def __init__(self, popen: subprocess.Popen[bytes], child_pid: int) -> None:
        self._popen = popen
        self._child_pid = child_pid
        self._buffer = b""
        self.cpu_seconds = 0.0
        self.alive = True
        for stream in (popen.stdin, popen.stdout):
            os.set_blocking(_fd(stream), False)

    @classmethod
    def start(
        cls,
        command: Sequence[str],
        setup: bytes,
        run_as: tuple[int, int] | None,
        timeout_s: float,
        seccomp: bytes,
    ) -> SandboxProcess:
        """`seccomp` is the compiled BPF filter bwrap loads before it runs the command."""
        deadline = time.monotonic() + timeout_s
        info_read, info_write = os.pipe()
        seccomp_read = _filled_pipe(seccomp)
        user: dict[str, Any] = {}
        if run_as is not None:
            user = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
        fds = ["--info-fd", str(info_write), "--seccomp", str(seccomp_read)]
        try:
            popen = subprocess.Popen(
                [command[0], *fds, *command[1:]],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(info_write, seccomp_read),
                start_new_session=True,
                env={},
                **user,
            )
        finally:
            os.close(info_write)
            os.close(seccomp_read)
        try:
            child_pid = _child_pid(info_read, deadline)
        finally:
            os.close(info_read)
        if child_pid is None:
            popen.kill()
            _, stderr = popen.communicate(timeout=5)
            raise SandboxStartError(
                stderr[:MAX_STDERR_BYTES].decode(errors="replace").strip() or "bwrap failed"
            )
        process = cls(popen, child_pid)
        process._handshake(setup, deadline, timeout_s)
        return process

    def call(self, payload: bytes, timeout_s: float) -> float | str:
        """The function's score for one call, or why it failed; a hang or crash ends the process."""
        deadline = time.monotonic() + timeout_s
        try:
            line = self._send(payload, deadline) and self._receive(deadline)
        except _Died:
            self.kill()
            return DIED
        if not line:
            self.kill()
            return f"timed out after {timeout_s:g}s"
        reply = _parse(line)
        if reply is None:
            self.kill()
            return "broke the sandbox protocol (wrote to the runner's pipe?)"
        self.cpu_seconds = reply["cpu"]
        return reply["v"] if "v" in reply else reply["error"]

    def kill(self) -> None:
        if self._popen.poll() is None:
            # The sandbox's pid 1: its death takes every process of the pid namespace with it,
            # and the outer bwrap, its parent, then exits and is reaped here (no orphans).
            with suppress(ProcessLookupError, PermissionError):
                os.kill(self._child_pid, signal.SIGKILL)
            try:
                self._popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        for stream in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        self.alive = False

    def _handshake(self, setup: bytes, deadline: float, timeout_s: float) -> None:
        try:
            line = self._send(setup, deadline) and self._receive(deadline)
        except _Died:
            self.kill()
            raise SetupFailed(f"failed to load: {DIED}") from None
        if not line:
            self.kill()
            raise SetupFailed(f"failed to load within {timeout_s:g}s")
        try:
            ready = json.loads(line)
        except ValueError:
            ready = None
        if not isinstance(ready, dict) or ready.get("ready") is not True:
            self.kill()
            error = ready.get("error") if isinstance(ready, dict) else None
            raise SetupFailed(error if isinstance(error, str) else "failed to load")

    def _send(self, data: bytes, deadline: float) -> bool:
        """Writes all of `data` before the deadline (False if it could not: the process stopped reading)."""
        fd = _fd(self._popen.stdin)
        view = memoryview(data)
        while view:
            if not _wait(fd, select.POLLOUT, deadline):
                return False
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise _Died from None
        return True

    def _receive(self, deadline: float) -> bytes | None:
        """One reply line before the deadline (None if none came); more than one line is no reply."""
        fd = _fd(self._popen.stdout)
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY_BYTES:
                return b"-"  # unparseable: the caller ends the process
            if not _wait(fd, select.POLLIN, deadline):
                return None
            try:
                chunk = os.read(fd, MAX_REPLY_BYTES + 1)
            except BlockingIOError:
                continue
            if not chunk:
                raise _Died
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return b"-" if self._buffer or len(line) > MAX_REPLY_BYTES else line


def _fd(stream: IO[bytes] | None) -> int:
    assert stream is not None  # Popen was given PIPE for it
    return stream.fileno()


def _filled_pipe(data: bytes) -> int:
    """The read end of a pipe that holds `data` and then ends: bwrap reads its filter to EOF, and
    each process needs its own (a shared file's offset would be at the end after the first)."""
    read, write = os.pipe()
    try:
        # The filter (at most 32 KiB) fits a pipe's buffer: this write never waits for a reader.
        if os.write(write, data) != len(data):
            raise OSError(f"the seccomp filter ({len(data)} bytes) does not fit a pipe")
    except OSError:
        os.close(read)
        raise
    finally:
        os.close(write)
    return read


def _wait(fd: int, event: int, deadline: float) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    # POLLHUP/POLLERR count as ready: the read or write that follows reports the death.
    return bool(poller.poll(remaining * 1000))


def _child_pid(fd: int, deadline: float) -> int | None:
    """bwrap's --info-fd report: the host pid of the sandbox's pid 1, or None if bwrap failed."""
    data = b""
    while len(data) < 4096 and _wait(fd, select.POLLIN, deadline):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with suppress(ValueError):
            pid = json.loads(data).get("child-pid")
            return pid if isinstance(pid, int) and pid > 0 else None
    return None


def _reject_constant(name: str) -> float:
    raise ValueError(name)


def _parse(line: bytes) -> dict[str, Any] | None:
    """A reply, checked: {"v": finite float, "cpu"} or {"error": str, "cpu"}; None for anything else."""
    try:
        reply = json.loads(line, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(reply, dict) or not isinstance(reply.get("cpu"), (int, float)):
        return None
    value, error = reply.get("v"), reply.get("error")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {"v": float(value), "cpu": float(reply["cpu"])}
    if value is None and isinstance(error, str):
        return {"error": error, "cpu": float(reply["cpu"])}
    return None
