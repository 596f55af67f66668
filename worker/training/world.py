"""Owns what one training process knows of the others in a multi-device run: its rank, and the few
collectives the loop needs (sum gradients and counters, agree on rank 0's decisions, start equal).

A one-process run uses `World()`: every collective is then the identity, so the loop has one code
path whatever the device count. The processes themselves are started by worker/training/distributed.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Gradients travel in buckets of at most this many elements: one flat copy of a whole model's
# gradients (full fine-tuning) would double their memory.
BUCKET_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 is the one that reports and writes)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[object]) -> list[int]:
        """Indices of `items` this rank handles: round robin, so each rank gets every size-th one."""
        return list(range(self.rank, len(items), self.size))

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over every rank (float64 on the way)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank: decisions only it may take (a cancel, a clock-based cadence)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    @torch.no_grad()
    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every rank's gradients summed into each rank's `.grad` (a rank with no rows adds zeros)."""
        if not self.distributed:
            return
        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for grad, summed in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(summed)

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` into every rank's (the weights every rank starts from)."""
        if not self.distributed:
            return
        for bucket in _buckets(list(tensors)):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.broadcast(flat, src=0)
            for tensor, value in zip(
                bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True
            ):
                tensor.copy_(value)

    def check_same(self, what: str, description: object) -> None:
        """Fail on every rank, naming `what`, unless each rank built the same `description`."""
        if not self.distributed:
            return
        seen: list[object] = [None] * self.size
        dist.all_gather_object(seen, description)
        differing = [rank for rank, value in enumerate(seen) if value != seen[0]]
        if differing:
            raise RuntimeError(
                f"multi-device training: rank(s) {differing} built a different {what} than rank 0; "
                "every rank must resolve the same model (see the worker log of each rank)"
            )


@contextlib.contextmanager
def micro_batch_rng(device: torch.device, seed: int, step: int, index: int) -> Iterator[None]:
    """Dropout draws from a stream seeded by (seed, step, micro-batch): the same masks whichever rank
    runs the micro-batch, so a run's trajectory (and an exact resume) does not depend on the device
    count. The process's own RNG stream is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(hash((seed, step, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        yield


def backend() -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(rank: int, size: int, address: str, timeout_seconds: float) -> World:
    """Join the run's process group as `rank` (each rank on its own GPU, when there are GPUs).

    `timeout_seconds` bounds every collective: a rank that stops answering fails the others after it
    instead of hanging them forever (gloo notices a dead peer's closed socket sooner still).
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend(),
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_seconds),
    )
    return World(rank, size)


def leave() -> None:
    """Leave the process group (the Celery process, as rank 0, may run another job afterwards)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors, each run at most BUCKET_ELEMENTS long (or one tensor)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        fits = (
            bool(buckets)
            and buckets[-1][0].dtype == tensor.dtype
            and size + tensor.numel() <= BUCKET_ELEMENTS
        )
        if not fits:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += tensor.numel()
    return buckets
