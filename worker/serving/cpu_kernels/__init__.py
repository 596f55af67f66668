"""CPU kernels the serving engine compiles for the machine it runs on (see small_gemm.c for why).

The C source is compiled once per machine with the system C compiler into a cache directory
(`KernelConfig.cache_dir`, default `~/.cache/tuneforge/kernels`) and loaded with ctypes: no build step
at install, nothing to ship per CPU. Where there is no compiler, no AVX2/FMA or any other problem,
`small_gemm()` returns None with the reason logged, and the engine multiplies with torch instead.
The serving entry point (worker/serve_main.py) fills `KernelConfig` from its environment.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_gemm.c")
# -ffp-contract=off: the kernel's FMAs are explicit; the compiler must not fuse the scalar tail's
# multiply-add in one inlined copy and not in another (outputs must not depend on the batch shape).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")
MAX_ROWS = 8
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_ssize_t


@dataclass(frozen=True)
class KernelConfig:
    """Whether the small-step kernel is used, where its build is cached, and which compiler builds it."""

    enabled: bool = True
    cache_dir: Path | None = None  # None: ~/.cache/tuneforge/kernels
    compiler: str | None = None  # tried before cc and gcc


class SmallGemm:
    """`x @ weight.T + bias` for 1..MAX_ROWS rows of fp32 x; bit-identical per row whatever the row count."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.tf_small_gemm
        self._fn.argtypes = [
            *(_POINTER, _SIZE, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE, ctypes.c_int)
        ]
        # 2: a helper thread takes half of each weight (see small_gemm.c); with the spinning hand-off
        # that shortens few-row steps markedly on a 2-core CPU.
        self.threads = min(2, os.cpu_count() or 1)
        self._fn.restype = ctypes.c_int

    def supports(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self.takes_weight(weight) and self.takes_rows(x)

    @staticmethod
    def takes_weight(weight: torch.Tensor) -> bool:
        """Fixed per weight: checked once when a layer is built, not on every step."""
        return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()

    @staticmethod
    def takes_rows(x: torch.Tensor) -> bool:
        return 1 <= x.shape[0] <= MAX_ROWS and x.dtype == torch.float32 and x.stride(-1) == 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, inner = x.shape
        out_features = weight.shape[0]
        if weight.shape[1] != inner:
            raise ValueError(f"x has {inner} features, the weight {weight.shape[1]}")
        y = torch.empty(rows, out_features, dtype=torch.float32)
        status = self._fn(
            x.data_ptr(),
            rows,
            x.stride(0),
            weight.data_ptr(),
            out_features,
            inner,
            bias.data_ptr() if bias is not None else None,
            y.data_ptr(),
            out_features,
            self.threads,
        )
        if status != 0:
            raise ValueError(f"small_gemm takes 1..{MAX_ROWS} rows, not {rows}")
        return y


def small_gemm(config: KernelConfig | None = None) -> SmallGemm | None:
    """The compiled kernel for this machine, or None (reason logged) where it cannot be built."""
    return _built(config or KernelConfig())


@cache
def _built(config: KernelConfig) -> SmallGemm | None:
    reason = _unsupported_reason(config)
    if reason is None:
        try:
            return SmallGemm(ctypes.CDLL(str(_compiled(config))))
        except subprocess.CalledProcessError as exc:
            reason = f"compiling {SOURCE.name} failed: {exc.stderr.decode(errors='replace')[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = f"building or loading {SOURCE.name} failed: {exc}"
    log.warning("serving without the small-step CPU kernel (%s): decode steps use torch's GEMM", reason)
    return None


def _unsupported_reason(config: KernelConfig) -> str | None:
    if not config.enabled:
        return "switched off (KernelConfig.enabled is False)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} is not x86-64"
    flags = _cpu_flags()
    missing = {"avx2", "fma"} - flags
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if _compiler(config) is None:
        return "no C compiler (cc/gcc) on PATH"
    return None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler(config: KernelConfig) -> str | None:
    for name in (config.compiler, "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _compiled(config: KernelConfig) -> Path:
    """The shared library, compiled on first use; keyed by source, flags, compiler and CPU."""
    compiler = _compiler(config)
    assert compiler is not None
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join((compiler, *FLAGS)).encode())
    key.update(" ".join(sorted(_cpu_flags())).encode())
    cache_dir = config.cache_dir or Path.home() / ".cache/tuneforge/kernels"
    target = cache_dir / f"small_gemm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent engines never load a half-written library.
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120
        )
        os.replace(built, target)
    log.info("compiled %s for this CPU: %s", SOURCE.name, target)
    return target
