"""Placement by memory: which worker class (and so which train queue) a job goes to.

At submission the job's peak training memory is estimated from its base model's config.json
(`tuneforge.rules.memory`); the job goes to the smallest configured worker class whose memory per
device holds it, with gradient checkpointing turned on when that is what makes it fit; a job no
class can hold is refused (422) with the numbers and what to change. The estimate and the chosen
class are recorded on the job, and every later send (the sweeper's) uses the recorded queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge.config import FROZEN_BASE_ADAPTERS, FinetuningConfig
from tuneforge.rules import memory

from app.errors import InvalidInputError
from app.queue import class_queue
from app.settings import Settings, WorkerClass


@dataclass(frozen=True)
class Placement:
    """Where a job goes and why; `record` is what the job stores (and its API response shows)."""

    worker_class: str | None
    config: FinetuningConfig  # the config to store: gradient checkpointing on when it made the fit
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def turned_on_checkpointing(self) -> bool:
        return bool(self.record.get("gradient_checkpointing_turned_on"))


def queue_for(settings: Settings, worker_class: str | None) -> str:
    """The queue a job placed on `worker_class` (None: unplaced) is sent to."""
    return settings.train_queue if worker_class is None else class_queue(settings.train_queue, worker_class)


def by_size(classes: list[WorkerClass]) -> list[WorkerClass]:
    """Smallest first: memory per device, then fewer devices, so big machines stay free for big jobs."""
    return sorted(classes, key=lambda spec: (spec.memory_gib, spec.device_count, spec.name))


def place(
    settings: Settings, config: FinetuningConfig, base_model: str, model_config: dict[str, Any] | None
) -> Placement:
    """The job's class and the estimate behind it, from the base model's config.json where the control
    plane can read it (`AvailableModel.config`); InvalidInputError (422) when no class holds it."""
    if model_config is None:
        reason = f"estimate unavailable: {base_model}'s config.json is not known to the control plane"
        return Placement(None, config, {"estimate": None, "reason": reason})
    try:
        memory.ModelShape.from_config(model_config)
    except memory.ModelShapeError as exc:
        return Placement(None, config, {"estimate": None, "reason": f"estimate unavailable: {exc}"})
    if not settings.worker_classes:
        # No classes configured: everything shares the one train queue, as a GPU-kind default.
        estimate = memory.estimate(model_config, config, device="cuda")
        return Placement(None, config, {"estimate": estimate.to_json(), "device": "cuda"})
    for spec in by_size(settings.worker_classes):
        fit = memory.fit(model_config, config, spec.memory_gib * memory.GIB, device=spec.device)
        if fit.fits:
            return Placement(spec.name, config, _record(spec, fit.estimate, turned_on=False))
        if fit.fits_with_checkpointing:
            checkpointed = config.model_copy(update={"gradient_checkpointing": True})
            return Placement(spec.name, checkpointed, _record(spec, fit.checkpointed, turned_on=True))
    raise _too_big(settings, model_config, config)


def _record(spec: WorkerClass, estimate: memory.MemoryEstimate, *, turned_on: bool) -> dict[str, Any]:
    return {
        "estimate": estimate.to_json(),
        "device": spec.device,
        "worker_class": spec.name,
        "class_memory_gib": spec.memory_gib,
        "gradient_checkpointing_turned_on": turned_on,
    }


def _too_big(settings: Settings, model_config: dict[str, Any], config: FinetuningConfig) -> InvalidInputError:
    largest = max(settings.worker_classes, key=lambda spec: (spec.memory_gib, spec.device_count))
    as_configured = memory.estimate(model_config, config, device=largest.device)
    checkpointed = memory.estimate(model_config, config, device=largest.device, gradient_checkpointing=True)
    if config.quantization_bits is None:
        # Checkpointing alone did not make it fit (place() would have turned it on): both together might.
        lora = "" if config.adapter in FROZEN_BASE_ADAPTERS else "`adapter: lora` with "
        hint = f"try {lora}`quantization_bits: 4` and `gradient_checkpointing: true`, or "
    else:
        hint = "try `gradient_checkpointing: true` with "
    return InvalidInputError(
        f"params: this job needs ~{as_configured.total / memory.GIB:.1f} GiB per device "
        f"(~{checkpointed.total / memory.GIB:.1f} GiB with gradient checkpointing); the largest worker "
        f"class ({largest.name}) has {largest.memory_gib:g} GiB per device; {hint}a smaller "
        "`micro_batch_size` or `max_seq_length`"
    )
