"""Owns the optimiser and learning-rate schedule a config names."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers import get_scheduler
from tuneforge.config import LrSchedulerConfig, OptimizerConfig

from worker.training.runtime import TrainingConfigError


def build_optimizer(
    spec: OptimizerConfig,
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    learning_rate: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters; biases and norm weights get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _name, param in named_params:
        # Decaying a gain or an offset pulls it towards 0, which is not a smaller model but a broken one.
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if spec.type == "adamw_torch":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=spec.betas, eps=spec.eps)
    if spec.type == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=spec.momentum)
    return _bitsandbytes_optimizer(spec, groups, learning_rate, device)


def _bitsandbytes_optimizer(
    spec: OptimizerConfig, groups: list[dict[str, Any]], learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a worker dependency
        raise TrainingConfigError(f"optimizer.type {spec.type!r} needs bitsandbytes: {exc}") from None
    if spec.type == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=spec.betas, eps=spec.eps)
    if device.type != "cuda":
        # Paging moves optimizer state between GPU and host memory; on a CPU all state is host memory
        # already, so the same 32-bit AdamW runs unpaged.
        return bnb.optim.AdamW(groups, lr=learning_rate, betas=spec.betas, eps=spec.eps, optim_bits=32)
    return bnb.optim.PagedAdamW32bit(groups, lr=learning_rate, betas=spec.betas, eps=spec.eps)


def build_scheduler(
    spec: LrSchedulerConfig, optimizer: torch.optim.Optimizer, *, warmup_ratio: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = math.ceil(warmup_ratio * total_steps)
    if spec.type == "cosine" and spec.min_lr_ratio > 0:
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"num_cycles": spec.num_cycles, "min_lr_rate": spec.min_lr_ratio},
        )
    if spec.type == "cosine":
        return get_scheduler(
            "cosine",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"num_cycles": spec.num_cycles},
        )
    # "constant" means no warm-up at all; "constant_with_warmup" honours warmup_ratio.
    return get_scheduler(
        spec.type,
        optimizer,
        num_warmup_steps=warmup if spec.type != "constant" else 0,
        num_training_steps=total_steps,
    )
