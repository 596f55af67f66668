"""The reward sandbox: tenants' reward functions, untrusted Python, scored in bubblewrap processes.

Each function gets its own long-lived sandbox process (so one function's hang, crash or tampering
never costs another its scores), started lazily and fed one JSON line per call by the runner in
reward_runner.py. The process sees no network (its own network namespace), no process of the
worker (its own pid namespace), no environment variable of the worker, and a filesystem of only
the Python installation, read-only, a small private /tmp and, when the job asks for packages, the
worker's site-packages read-only. It runs under RLIMIT_AS / CPU / NPROC / FSIZE / NOFILE, and as
`nobody` where the worker runs as root (root is exempt from RLIMIT_NPROC), behind a seccomp filter
that refuses the syscalls no reward function needs (reward_seccomp.py). The parent enforces a
wall-clock limit per call by killing the process, which the next call restarts. There is no
fallback without bubblewrap or libseccomp: a worker without them cannot score.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.training.reward_process import SandboxProcess, SandboxStartError, SetupFailed
from worker.training.reward_seccomp import seccomp_program

RUNNER = Path(__file__).with_name("reward_runner.py").read_text()
MAX_ERROR_CHARS = 200
# How long a sandbox may take to start and define its function (Python starts in ~50 ms).
START_TIMEOUT_S = 10.0
# Writable space inside: a private tmpfs /tmp, and no file larger than this anywhere.
TMP_BYTES = 8 * 2**20
MAX_FILE_BYTES = 2**20
MAX_OPEN_FILES = 64
PROBE_SOURCE = "def probe(prompt, completion, example):\n    return 1.0\n"
# Top-level directories that are links into /usr on merged-/usr systems (or real ones elsewhere).
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class SandboxLimits:
    call_timeout_seconds: float = 5.0  # wall clock per function call
    cpu_seconds: int = 10  # RLIMIT_CPU of the sandbox process (per batch process)
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS
    max_processes: int = 16  # RLIMIT_NPROC inside the sandbox's own user namespace: fork bombs die

    def __post_init__(self) -> None:
        # The sandbox itself needs its pid 1 and the runner, and Python ~30 MiB of address space.
        if self.call_timeout_seconds <= 0 or self.cpu_seconds < 1:
            raise ValueError("SandboxLimits: call_timeout_seconds must be > 0 and cpu_seconds >= 1")
        if self.memory_bytes < 64 * 2**20 or self.max_processes < 2:
            raise ValueError("SandboxLimits: memory_bytes must be >= 64 MiB and max_processes >= 2")


@dataclass(frozen=True)
class Scores:
    values: dict[str, list[float]]  # function name -> one score per completion (0.0 where it failed)
    failures: dict[str, int]  # function name -> how many calls failed
    errors: dict[str, str]  # function name -> first failure message, short, for the job's events


class RewardSandbox:
    """Scores completions with tenants' reward functions. Not thread-safe: one caller at a time.

    Processes start in the thread that calls score(), and bubblewrap's --die-with-parent ends them
    when that thread exits: score from the training thread, not from a short-lived one.
    """

    def __init__(
        self,
        functions: Mapping[str, str],
        limits: SandboxLimits = SandboxLimits(),
        packages: Sequence[str] = (),
    ) -> None:
        self._limits = limits
        self._defs = {name: _defined_function(name, source) for name, source in functions.items()}
        self._sources = dict(functions)
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise RuntimeError("reward functions need bubblewrap (bwrap) on the worker")
        self._seccomp = seccomp_program()  # once: every process of this sandbox loads the same
        self._run_as = _unprivileged_user()
        executable, binds = _interpreter(self._run_as is not None)
        site_dirs = [_package_dir(name) for name in packages]
        self._command = _bwrap_command(bwrap, executable, binds + sorted(set(site_dirs)))
        self._paths = sorted(set(site_dirs))
        self._processes: dict[str, SandboxProcess] = {}
        self._probe()

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
    ) -> Scores:
        if not len(prompts) == len(completions) == len(examples):
            raise ValueError(
                f"prompts, completions and examples must be parallel lists, got "
                f"{len(prompts)}, {len(completions)} and {len(examples)} entries"
            )
        payloads = [
            _payload(i, *call) for i, call in enumerate(zip(prompts, completions, examples, strict=True))
        ]
        values = {name: [0.0] * len(completions) for name in self._defs}
        failures = dict.fromkeys(self._defs, 0)
        errors: dict[str, str] = {}
        for name in self._defs:
            for index, outcome in enumerate(self._calls(name, payloads)):
                if isinstance(outcome, float):
                    values[name][index] = outcome
                else:
                    failures[name] += 1
                    errors.setdefault(name, outcome[:MAX_ERROR_CHARS])
        return Scores(values=values, failures=failures, errors=errors)

    def close(self) -> None:
        for process in self._processes.values():
            process.kill()
        self._processes.clear()

    def __enter__(self) -> RewardSandbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()

    def _calls(self, name: str, payloads: Sequence[bytes]) -> Iterator[float | str]:
        """One outcome per completion: a score, or why the call failed."""
        broken: str | None = None  # the function cannot even be defined: every call fails alike
        for payload in payloads:
            if broken is not None:
                yield broken
                continue
            try:
                process = self._process(name)
            except SetupFailed as exc:
                broken = str(exc)
                yield broken
                continue
            outcome = process.call(payload, self._limits.call_timeout_seconds)
            if not process.alive or process.cpu_seconds > self._cpu_recycle_s():
                # Dead, or near its CPU limit: the next call gets a fresh process rather than
                # losing itself to a SIGXCPU halfway through.
                self._processes.pop(name).kill()
            yield outcome

    def _cpu_recycle_s(self) -> float:
        # Room for one more single-threaded call to run to its timeout, or at least half the budget
        # (a fresh process costs ~50 ms: not one per call).
        cpu = self._limits.cpu_seconds
        return max(cpu / 2, cpu - self._limits.call_timeout_seconds)

    def _process(self, name: str) -> SandboxProcess:
        process = self._processes.get(name)
        if process is None:
            process = self._start(name, self._sources[name], self._defs[name])
            self._processes[name] = process
        return process

    def _start(self, name: str, source: str, defined: str) -> SandboxProcess:
        setup = {
            "limits": {
                "cpu": self._limits.cpu_seconds,
                "memory": self._limits.memory_bytes,
                "nproc": self._limits.max_processes,
                "fsize": MAX_FILE_BYTES,
                "nofile": MAX_OPEN_FILES,
                "core": 0,
            },
            "paths": self._paths,
            "name": name,
            "def": defined,
            "source": source,
        }
        return SandboxProcess.start(
            self._command, json.dumps(setup).encode() + b"\n", self._run_as, START_TIMEOUT_S, self._seccomp
        )

    def _probe(self) -> None:
        # Start one sandbox now, so a worker that cannot run them (no user namespaces, an
        # unreadable interpreter) fails the job at once with the reason, not with every score 0.
        try:
            self._start("probe", PROBE_SOURCE, "probe").kill()
        except (SandboxStartError, SetupFailed) as exc:
            raise RuntimeError(f"the reward sandbox cannot start on this worker: {exc}") from None


def _payload(index: int, prompt: str, completion: str, example: Mapping[str, Any]) -> bytes:
    """One call's JSON line. Values JSON lacks (dates, bytes) travel as their str()."""
    try:
        return json.dumps({"p": prompt, "c": completion, "e": example}, default=str).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"examples[{index}] cannot be passed to a reward function as JSON: {exc}") from None


def _defined_function(name: str, source: str) -> str:
    """The name the source defines for reward function `name` (parsed here, never run)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"reward function {name!r}: the source is not valid Python: {exc}") from None
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    if name in defined:
        return name
    if len(defined) != 1:
        raise ValueError(f"reward function {name!r}: the source must define exactly one function")
    return defined[0]


def _unprivileged_user() -> tuple[int, int] | None:
    """(uid, gid) to drop to when the worker runs as root, whom the kernel exempts from RLIMIT_NPROC."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return 65534, 65534


def _others_can_read(path: Path) -> bool:
    """Whether any user can reach `path` (every parent searchable, the path itself readable)."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)
    except OSError:
        return False


def _interpreter(as_other_user: bool) -> tuple[str, list[str]]:
    """The Python the sandbox runs (the worker's own base interpreter, never its venv) and the
    directories it needs. When the sandbox runs as another user, an interpreter that user cannot
    read (pyenv under /root) gives way to the system's Python of the same version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    candidates = [(base, Path(sys.base_prefix).resolve()), (Path("/usr/bin") / version, Path("/usr"))]
    for executable, prefix in candidates:
        stdlib = prefix / "lib" / version
        if not (executable.is_file() and stdlib.is_dir() and executable.is_relative_to(prefix)):
            continue
        if as_other_user and not (_others_can_read(executable) and _others_can_read(stdlib)):
            continue
        binds = [] if prefix.is_relative_to("/usr") else [str(prefix)]
        return str(executable), binds
    raise RuntimeError(f"the reward sandbox finds no {version} interpreter it can run")


def _package_dir(name: str) -> str:
    """The site-packages directory holding installed distribution `name`."""
    try:
        distribution = importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        raise ValueError(
            f"runtime.packages: {name!r} is not installed on the workers; "
            "reward functions can use only installed packages"
        ) from None
    return str(Path(str(distribution.locate_file(""))).resolve())


def _bwrap_command(bwrap: str, executable: str, binds: Sequence[str]) -> list[str]:
    command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    command += ["--die-with-parent", "--new-session", "--clearenv"]
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    # Numeric libraries start a thread per core by default: threads count against RLIMIT_NPROC.
    environment |= dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    for key, value in environment.items():
        command += ["--setenv", key, value]
    command += ["--ro-bind", "/usr", "/usr"]
    for directory in SYSTEM_DIRS:
        path = Path(directory)
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), directory]
        elif path.is_dir():
            command += ["--ro-bind", directory, directory]
    for directory in binds:
        command += ["--ro-bind", directory, directory]
    command += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    command += ["--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp", "--remount-ro", "/"]
    return [*command, "--", executable, "-I", "-S", "-c", RUNNER]
