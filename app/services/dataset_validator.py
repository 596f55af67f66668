"""Runs dataset validation off the request path, and re-runs what a crash left unvalidated."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from app.context import AppContext
from app.services import datasets

log = logging.getLogger(__name__)


class DatasetValidator:
    """A small thread pool in the control-plane process.

    Validation is I/O-bound streaming plus light parsing, so threads suffice. A dataset is
    `validating` in the database until its verdict is recorded, so nothing is lost if the
    process dies: `resume_pending` on the next start picks it up again.
    """

    def __init__(self, ctx: AppContext, workers: int = 2) -> None:
        self._ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataset-validation")

    def submit(self, dataset_id: int) -> Future[None]:
        return self._pool.submit(self._run, dataset_id)

    def resume_pending(self) -> int:
        ids = datasets.pending_validation_ids(self._ctx)
        for dataset_id in ids:
            self.submit(dataset_id)
        return len(ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _run(self, dataset_id: int) -> None:
        try:
            datasets.validate(self._ctx, dataset_id)
        except Exception:
            # Left `validating`: the next resume_pending retries it (e.g. after a storage outage).
            log.exception("validation of dataset %s failed; it will be retried", dataset_id)
