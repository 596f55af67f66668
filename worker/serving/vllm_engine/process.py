"""The vLLM child process of one serving process: its command line, start, readiness, death and stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

LAUNCH_SCRIPT = Path(__file__).with_name("launch.py")
# How often startup checks /health (vLLM offers no event to wait on), and how long it may take at most.
HEALTH_POLL_S = 0.5
DEFAULT_STARTUP_TIMEOUT_S = 900.0
STOP_GRACE_S = 10.0
# The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmConfig:
    """What the vLLM child is started with (`tuneforge serve --help`, the TUNEFORGE_VLLM_* settings)."""

    python: Path  # vLLM's interpreter (its own virtual environment)
    model_path: Path
    model_name: str  # the name requests use for the base model
    max_loras: int = 8
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    cpu_kv_cache_gib: float = 1.0
    # CUDA graphs / torch.compile warm-up: on the CPU they cost a minute of startup for little gain.
    enforce_eager: bool = True
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S

    def command(self, resolver_dir: Path, port: int, parent_pid: int) -> list[str]:
        args = [
            str(self.python), "-P", str(LAUNCH_SCRIPT),
            "--resolver-dir", str(resolver_dir), "--parent-pid", str(parent_pid), "--",
            "serve", str(self.model_path),
            "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", self.model_name,
            # tuneforge's engine samples with what the request says, not the model's generation_config.json
            "--generation-config", "vllm",
            "--enable-lora", "--max-loras", str(self.max_loras),
            "--max-lora-rank", str(vllm_lora_rank(self.max_lora_rank)),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--dtype", self.dtype,
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(max(self.max_cpu_loras, self.max_loras))]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Resolvers are consulted only with runtime LoRA updating on; vLLM listens on loopback, where only
        # this process reaches it, so its load/unload routes are no wider door than the resolver.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        # vLLM-CPU otherwise takes a fixed 20+ GiB for its KV cache.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.cpu_kv_cache_gib:g}")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        # vLLM-CPU's first step has torch inductor probe the CPU's vector ISA by importing torch in a child
        # Python; that child inherits vLLM's pinning to one core, and on a loaded 2-core machine it hung
        # past the probe's 60 s three times over (avx512_vnni, avx512, avx2) until vLLM's engine core gave
        # up. The ISA the CPU reports is trusted instead; an operator can still set the variable.
        env.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
        return env


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (tuneforge refuses adapters over `rank` itself)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), VLLM_MAX_LORA_RANKS[-1])


class VllmProcess:
    """One vLLM child in a process group of its own: started, awaited until healthy, watched, stopped.

    `on_exit` is called (from a watcher thread) when the child ends without `stop()` having been asked.
    """

    def __init__(self, config: VllmConfig, resolver_dir: Path, on_exit: Callable[[int], None]) -> None:
        self.config = config
        self.resolver_dir = resolver_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start vLLM and return once its /health answers 200; raises RuntimeError if it exits first."""
        command = self.config.command(self.resolver_dir, self.port, os.getpid())
        log.info("starting vLLM: %s", " ".join(command))
        # A group of its own: stopping it reaches vLLM's engine and worker processes too.
        self._proc = subprocess.Popen(command, env=self.config.environment(), start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="vllm-watch", daemon=True).start()

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    raise RuntimeError(f"vLLM exited with code {code} while starting (its log is above)")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(HEALTH_POLL_S)
        raise RuntimeError(f"vLLM did not become healthy within {self.config.startup_timeout_s:.0f} s")

    def _watch(self) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        if not self._stopping.is_set():
            log.critical("vLLM (pid %d) exited with code %s", self._proc.pid, code)
            self._on_exit(code)

    def stop(self) -> None:
        """SIGTERM to vLLM's process group, SIGKILL if it has not ended after a grace period."""
        self._stopping.set()
        if self._proc is None:
            return
        if self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %.0f s; killing it", STOP_GRACE_S)
        # Its engine and worker processes too, also when the leader died alone.
        _signal_group(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=STOP_GRACE_S)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
