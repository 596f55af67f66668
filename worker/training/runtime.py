"""Owns where and in what precision a run computes, and how much memory it has used."""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingConfigError(ValueError):
    """A config this worker cannot run as asked (e.g. fp16 on a CPU); the message says what to change."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype_name: str  # "fp32" | "bf16" | "fp16": the compute dtype actually used

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def half(self) -> bool:
        return self.dtype_name != "fp32"


def resolve_runtime(requested: str) -> Runtime:
    """The device this process trains on, and `requested` dtype ('auto' picks the native fast one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "auto":
        return Runtime(device, _native_half(device) or "fp32")
    if requested == "fp16" and device.type != "cuda":
        raise TrainingConfigError(
            "dtype: fp16 needs a CUDA GPU; this worker has none; use auto, bf16 or fp32"
        )
    if requested == "bf16" and _native_half(device) != "bf16":
        raise TrainingConfigError(
            f"dtype: this worker's {device.type} has no native bf16 arithmetic; use auto or fp32"
        )
    return Runtime(device, requested)


def _native_half(device: torch.device) -> str | None:
    """bf16 where the hardware computes it natively (Ampere+ GPUs, AVX512-BF16/AMX CPUs).

    On such CPUs bf16 matmuls run about 2x faster than fp32; elsewhere bf16 is emulated and slower,
    so fp32 is the better default there.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, plus CUDA's peak allocation and utilisation on a GPU."""
    # ru_maxrss is in KiB on Linux.
    metrics = {"peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    if device.type == "cuda":
        metrics["cuda_allocated_bytes"] = float(torch.cuda.max_memory_allocated(device))
        # Utilisation needs NVML (pynvml); the other metrics stand without it.
        with contextlib.suppress(Exception):
            metrics["gpu_utilization"] = float(torch.cuda.utilization(device))
    return metrics
