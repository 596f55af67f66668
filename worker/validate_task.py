"""The `tuneforge.validate` task: thin glue from a dataset id to `dataset_validation.validate`, under limits.

Imports no torch (nor anything of the training stack), so a validate node starts in a second and
runs in the control-plane image as well as the worker image.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from app.context import AppContext
from app.queue import VALIDATE_TASK
from app.services.dataset_files import validation as dataset_validation

log = logging.getLogger(__name__)


def register_validate_task(celery: Celery, ctx: AppContext) -> None:
    """Bind `tuneforge.validate` to `celery` with the validation time limits of `ctx.settings`."""
    limit = ctx.settings.validation_time_limit_seconds

    @celery.task(
        name=VALIDATE_TASK,
        soft_time_limit=limit,
        time_limit=dataset_validation.hard_time_limit(ctx.settings),
    )
    def validate_dataset(dataset_id: int) -> None:
        try:
            dataset_validation.validate(ctx, dataset_id)
        except SoftTimeLimitExceeded:
            dataset_validation.fail(
                ctx,
                dataset_id,
                f"validation ran past its time limit of {limit} s (TUNEFORGE_VALIDATION_TIME_LIMIT_SECONDS); "
                "split the file into smaller ones",
            )


def limit_memory(extra_bytes: int) -> int | None:
    """Cap this process's address space at what it maps now plus `extra_bytes`; returns the cap.

    An address-space limit (RLIMIT_AS) makes an allocation past it fail with MemoryError inside the
    validation, which records it as the dataset's error, instead of the kernel's OOM killer taking
    the worker (or a neighbour) down. None where the platform has no such limit.
    """
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        cap = pages * resource.getpagesize() + extra_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot cap validation memory on this platform (%s); running without a cap", exc)
        return None
    return cap
