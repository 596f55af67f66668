"""Hostile reward functions (issue 21): nothing a tenant's function does reaches the worker.

Each function reports what it managed to do as its score, or raises; the test then checks from the
outside (the test process stands in for the worker) that nothing happened here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyseccomp
import pytest

from worker.training.reward_sandbox import RewardSandbox, SandboxLimits, Scores

LIMITS = SandboxLimits(call_timeout_seconds=2.0, max_processes=16)
DIED = "the sandbox process died (memory or CPU limit, or the function ended it)"
# What a call the seccomp filter refuses raises inside (EPERM), as the function's error.
DENIED = "raised PermissionError: [Errno 1] Operation not permitted"
Run = Callable[..., Scores]
ALIVE = "def alive(prompt, completion, example):\n    return 7.0\n"


@pytest.fixture
def run_one() -> Iterator[Run]:
    """Scores one hostile function on one example, then checks the sandbox still scores afterwards."""
    opened: list[RewardSandbox] = []
    # The suite's own servers and workers are children of this process too; only new ones count.
    before = {child.pid for child in psutil.Process().children(recursive=True)}

    def run(source: str, example: dict[str, object], limits: SandboxLimits = LIMITS) -> Scores:
        box = RewardSandbox({"hostile": source, "alive": ALIVE}, limits)
        opened.append(box)
        scores = box.score(["p"], ["c"], [example])
        # The worker (this process) carries on, and so does the sandbox for the next batch.
        assert box.score(["p"], ["c"], [example]).values["alive"] == [7.0]
        return scores

    yield run
    for box in opened:
        box.close()
    # Whatever the function started (forked children included) ended with its sandbox.
    assert [c for c in psutil.Process().children(recursive=True) if c.pid not in before] == []


def _fails(scores: Scores) -> str:
    assert scores.values["hostile"] == [0.0]
    assert scores.failures["hostile"] == 1
    return scores.errors["hostile"]


def test_the_workers_environment_is_invisible(run_one: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_FAKE_STORAGE_SECRET", "s3cr3t-value")
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import os\n"
        "    seen = ' '.join(os.environ.values())\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit():\n"
        "            try:\n"
        "                seen += open('/proc/' + pid + '/environ', 'rb').read().decode()\n"
        "            except OSError:\n"
        "                pass\n"
        "    return 1.0 if 's3cr3t' in seen else 0.5\n"
    )
    assert run_one(source, {}).values["hostile"] == [0.5]


def test_no_connection_reaches_a_socket_listening_on_the_workers_loopback(run_one: Run) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        source = (
            "def hostile(prompt, completion, example):\n"
            "    import socket\n"
            "    socket.create_connection(('127.0.0.1', example['port']), timeout=1).sendall(b'hi')\n"
            "    return 1.0\n"
        )
        # The seccomp filter refuses the AF_INET socket itself; the network namespace is behind it.
        assert _fails(run_one(source, {"port": server.getsockname()[1]})) == DENIED
        with pytest.raises(BlockingIOError):
            server.accept()


def test_files_written_inside_never_land_on_the_host(run_one: Run, tmp_path: Path) -> None:
    name = f"reward-escape-{uuid.uuid4().hex}"
    source = (
        "def hostile(prompt, completion, example):\n"
        "    open('/tmp/' + example['name'], 'w').write('x')\n"  # its private tmpfs: allowed
        "    open(example['host_dir'] + '/' + example['name'], 'w').write('x')\n"
        "    return 1.0\n"
    )
    error = _fails(run_one(source, {"name": name, "host_dir": str(tmp_path)}))
    assert error.startswith(("raised FileNotFoundError", "raised OSError"))
    assert not (tmp_path / name).exists()
    assert not (Path("/tmp") / name).exists()
    # Nothing outside /tmp is writable, even where the directory exists inside.
    readonly = "def hostile(prompt, completion, example):\n    open('/usr/x', 'w')\n"
    assert "Read-only file system" in _fails(run_one(readonly, {}))


def test_the_workers_files_and_data_dirs_cannot_be_read(run_one: Run, tmp_path: Path) -> None:
    data = tmp_path / "data" / "blobs" / "other-tenant.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("secret rows")
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import os\n"
        "    visible = [p for p in example['paths'] if os.path.exists(p)]\n"
        "    if visible:\n"
        "        raise RuntimeError('can see ' + ' '.join(visible))\n"
        "    return 0.5\n"
    )
    worker_files = [str(data), str(Path(__file__).resolve()), sys.prefix, str(Path.cwd()), "/etc/passwd"]
    assert run_one(source, {"paths": worker_files}).values["hostile"] == [0.5]


def test_a_fork_bomb_is_contained_and_the_worker_can_still_fork(run_one: Run) -> None:
    # Counts how many processes it gets (each child lingers), then gives up at the limit.
    counting = (
        "def hostile(prompt, completion, example):\n"
        "    import os, time\n"
        "    n = 0\n"
        "    try:\n"
        "        while True:\n"
        "            if os.fork() == 0:\n"
        "                time.sleep(30)\n"
        "                os._exit(0)\n"
        "            n += 1\n"
        "    except OSError:\n"
        "        return n\n"
    )
    (forked,) = run_one(counting, {}).values["hostile"]
    assert 0 < forked < LIMITS.max_processes
    # The classic: every child forks too, and swallows the refusals.
    classic = (
        "def hostile(prompt, completion, example):\n"
        "    import os\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    assert _fails(run_one(classic, {})) == "timed out after 2s"
    assert subprocess.run(["true"], check=False).returncode == 0


def test_a_memory_hog_is_stopped_and_scores_zero(run_one: Run) -> None:
    # A generous timeout: the limit, not the clock, must stop it (filling 128 MiB is slow on a busy box).
    limits = SandboxLimits(call_timeout_seconds=20.0, memory_bytes=128 * 2**20)
    allocates = "def hostile(prompt, completion, example):\n    return len(bytearray(2 * 2**30))\n"
    assert _fails(run_one(allocates, {}, limits)) == "raised MemoryError: "
    # Small allocations kept alive until the limit: the process dies or raises, either way a 0.
    grows = (
        "def hostile(prompt, completion, example):\n"
        "    chunks = []\n"
        "    while True:\n"
        "        chunks.append(bytearray(2**20))\n"
    )
    assert _fails(run_one(grows, {}, limits)) in ("raised MemoryError: ", DIED)


def test_signals_cannot_reach_the_worker(run_one: Run) -> None:
    # The worker's pid means nothing in the sandbox's pid namespace; its parent there is the
    # sandbox's own pid 1, which ignores signals from inside.
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import os, signal\n"
        "    try:\n"
        "        os.kill(example['worker_pid'], signal.SIGTERM)\n"
        "        reached = 1.0\n"
        "    except ProcessLookupError:\n"
        "        reached = 0.5\n"
        "    for pid in (os.getppid(), 1):\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    return reached\n"
    )
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: seen.append(number))
    try:
        scores = run_one(source, {"worker_pid": os.getpid()})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert scores.values["hostile"] == [0.5], scores.errors
    assert seen == []


def test_the_worker_is_not_among_the_processes_the_function_sees(run_one: Run) -> None:
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import os\n"
        "    pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "    return float(example['worker_pid'] in pids or len(pids) > 3) + 0.5\n"
    )
    assert run_one(source, {"worker_pid": os.getpid()}).values["hostile"] == [0.5]


def test_output_on_the_runners_pipe_is_not_taken_for_a_score(run_one: Run) -> None:
    # A function that finds the runner's reply pipe and forges a huge score is only refused.
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import os\n"
        "    for fd in range(3, 10):\n"
        "        try:\n"
        "            os.write(fd, b'{\"v\": 1e9, \"cpu\": 0}\\n' + b'x' * 10000 + b'\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return 1.0\n"
    )
    started = time.monotonic()
    assert _fails(run_one(source, {})).startswith("broke the sandbox protocol")
    assert time.monotonic() - started < 10


# Calls a libc function by name (`syscall` for calls glibc has no wrapper for) and scores 1.0 if the
# kernel carried it out; a refusal raises with the errno the function saw. The arguments are chosen
# so that, without the filter, each call succeeds or fails with another errno than EPERM.
CALLS_LIBC = (
    "def hostile(prompt, completion, example):\n"
    "    import ctypes, os\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"
    "    args = [a.encode() if isinstance(a, str) else ctypes.c_long(a) for a in example['args']]\n"
    "    if getattr(libc, example['call'])(*args) == -1:\n"
    "        number = ctypes.get_errno()\n"
    "        raise OSError(number, os.strerror(number))\n"
    "    return 1.0\n"
)


def _syscall(name: str, *args: int) -> tuple[str, list[object]]:
    # The sandbox runs this interpreter's architecture: its syscall numbers are libseccomp's native ones.
    return "syscall", [pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name), *args]


@pytest.mark.parametrize(
    ("call", "args"),
    [
        # Tracing and reading other processes' memory.
        ("ptrace", [0, 0, 0, 0]),  # PTRACE_TRACEME
        ("process_vm_readv", [0, 0, 0, 0, 0, 0]),
        # Namespaces and mounts: a way out of the sandbox's view of the system.
        ("unshare", [0]),
        ("setns", [-1, 0]),
        ("chroot", ["/no-such-dir"]),
        # Kernel interfaces that exploits favour.
        ("personality", [0xFFFFFFFF]),  # only asks for the current persona
        _syscall("perf_event_open", 0, 0, -1, -1, 0),
        _syscall("keyctl", 99999),
        _syscall("io_uring_setup", 1, 0),
    ],
    ids=[
        "ptrace",
        "process_vm_readv",
        "unshare",
        "setns",
        "chroot",
        "personality",
        "perf",
        "keyctl",
        "io_uring",
    ],
)
def test_syscalls_the_filter_denies_fail_with_eperm_and_score_zero(
    run_one: Run, call: str, args: list[object]
) -> None:
    # EPERM, not a kill: the same process goes on to score the next batch (run_one checks it).
    assert _fails(run_one(CALLS_LIBC, {"call": call, "args": args})) == DENIED


@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6", "AF_NETLINK"])
def test_sockets_other_than_unix_ones_cannot_be_created(run_one: Run, family: str) -> None:
    # Inside its network namespace the sandbox could make these; the filter refuses the socket itself.
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import socket\n"
        "    socket.socket(getattr(socket, example['family']), socket.SOCK_DGRAM).close()\n"
        "    return 1.0\n"
    )
    assert _fails(run_one(source, {"family": family})) == DENIED


def test_unix_sockets_still_work(run_one: Run) -> None:
    source = (
        "def hostile(prompt, completion, example):\n"
        "    import socket\n"
        "    left, right = socket.socketpair()\n"
        "    left.sendall(b'abc')\n"
        "    socket.socket(socket.AF_UNIX).close()\n"
        "    return len(right.recv(3))\n"
    )
    scores = run_one(source, {})
    assert scores.values["hostile"] == [3.0], scores.errors
