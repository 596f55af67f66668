"""Owns the on-disk checkpoint layout: written atomically, read back for an exact resume, pruned.

A checkpoint directory `checkpoints/step-N/` holds the publishable weights at its top level (a PEFT
adapter, or a whole model) so a stopped job can serve it as its download, and everything else an
exact resume needs under `trainer/`: optimiser, scheduler, grad scaler, RNG states, the run's
progress and data position, and the best-so-far weights when they differ from the current ones.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_DIR = "trainer"
STATE_FILE = f"{TRAINER_DIR}/state.json"
BEST_WEIGHTS = f"{TRAINER_DIR}/best.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """What `save` writes beside the weights, and `load` gives back."""

    progress: dict[str, Any]  # the loop's counters (JSON)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None  # trainable weights of the best evaluation, if not the current


def save(
    path: Path,
    write_weights: Callable[[Path], None],
    state: TrainerState,
    extra_json: dict[str, Any],
) -> None:
    def write(tmp: Path) -> None:
        write_weights(tmp)
        (tmp / TRAINER_DIR).mkdir()
        torch.save(state.optimizer, tmp / TRAINER_DIR / "optimizer.pt")
        torch.save(state.scheduler, tmp / TRAINER_DIR / "scheduler.pt")
        torch.save(state.rng, tmp / TRAINER_DIR / "rng_state.pt")
        if state.scaler is not None:
            torch.save(state.scaler, tmp / TRAINER_DIR / "scaler.pt")
        if state.best is not None:
            save_file({k: v.contiguous() for k, v in state.best.items()}, str(tmp / BEST_WEIGHTS))
        payload = {"progress": state.progress, **extra_json}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    write_atomically(path, write)


def load(path: Path, device: torch.device) -> tuple[TrainerState, dict[str, Any]]:
    """The trainer state of a checkpoint, and the rest of its state.json (config, decisions, ...)."""
    payload = json.loads((path / STATE_FILE).read_text())
    trainer = path / TRAINER_DIR
    scaler_file, best_file = trainer / "scaler.pt", path / BEST_WEIGHTS
    state = TrainerState(
        progress=payload.pop("progress"),
        # Our own files, written by `save`; weights_only keeps even those from running code.
        optimizer=torch.load(trainer / "optimizer.pt", map_location=device, weights_only=True),
        scheduler=torch.load(trainer / "scheduler.pt", weights_only=True),
        scaler=torch.load(scaler_file, weights_only=True) if scaler_file.exists() else None,
        rng=torch.load(trainer / "rng_state.pt", weights_only=True),
        best=load_file(best_file) if best_file.exists() else None,
    )
    return state, payload


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def prune(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step-N directories; returns what was deleted."""
    found = sorted(
        (int(match.group(1)), child)
        for child in checkpoints_dir.glob("step-*")
        if (match := _STEP_DIR.match(child.name))
    )
    doomed = [path for _, path in found[:-keep]] if keep > 0 else [path for _, path in found]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a scratch sibling, then rename: a reader never sees a half-written directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    scratch.mkdir()
    try:
        write(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
