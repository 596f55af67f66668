"""The client's wire models read what the server sends, including keys newer servers add."""

from __future__ import annotations

from tuneforge.models import FinetuningJob, JobPhase


def test_a_timeline_entry_keeps_its_detail_and_a_plain_status_has_none() -> None:
    phase = JobPhase.model_validate(
        {"startedAt": "2026-05-12T10:00:00+00:00", "detail": "speculator step 120", "later": 1}
    )
    assert phase.detail == "speculator step 120" and phase.started_at is not None
    assert JobPhase.model_validate({"startedAt": "2026-05-12T10:00:00+00:00"}).detail is None


def test_a_job_reads_its_worker_class_and_memory_estimate() -> None:
    wire = {
        "uuid": "u",
        "baseModel": "smollm2-135m",
        "targetRepoName": "r",
        "targetVersionTag": 1,
        "status": "queued",
        "accelerator": {"id": "l4"},
        "workerClass": "l4",
        "placement": {"estimate": {"total_gib": 3.2, "parts": {"logits": 1}}, "worker_class": "l4"},
    }
    job = FinetuningJob.model_validate(wire)
    assert (job.accelerator, job.worker_class) == ("l4", "l4")
    assert job.placement is not None and job.placement["estimate"]["total_gib"] == 3.2
