"""Adapter ids `repo/tag`: parsed strictly, derived from jobs, and a finished job's outcome as exceptions."""

from __future__ import annotations

from typing import Any

import pytest
from tuneforge import FinetuningCanceledError, FinetuningError, FinetuningJob, TuneforgeError, ValidationError
from tuneforge.adapter_ids import parse_adapter_id, parse_version_ref
from tuneforge.models import AdapterVersion


def _job(**fields: Any) -> FinetuningJob:
    wire = {
        "uuid": "j-1",
        "baseModel": "tiny-random-llama",
        "datasetName": "qa",
        "targetRepoName": "dates",
        "targetVersionTag": 3,
        "accelerator": {"id": "cpu"},
        "status": "completed",
        "params": {"base_model": "tiny-random-llama"},
        "createdAt": "2026-01-02T03:04:05Z",
        "attempt": 1,
        "stepsDone": 4,
        "totalSteps": 4,
    }
    return FinetuningJob.model_validate(wire | fields)


@pytest.mark.parametrize(
    ("adapter_id", "parsed"), [("dates/3", ("dates", 3)), ("a.b-c_d/12", ("a.b-c_d", 12))]
)
def test_valid_adapter_ids_parse_to_repo_and_tag(adapter_id: str, parsed: tuple[str, int]) -> None:
    assert parse_adapter_id(adapter_id) == parsed


@pytest.mark.parametrize("bad", ["dates", "dates/", "/3", "dates/latest", "dates/0", "dates/-1", "dates/3@2"])
def test_malformed_adapter_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match=repr(bad)):
        parse_adapter_id(bad)


def test_a_version_object_parses_through_its_id() -> None:
    version = AdapterVersion.model_validate({"uuid": "v", "repo": "dates", "tag": 3, "status": "queued"})
    assert parse_adapter_id(version) == ("dates", 3)


def test_a_job_names_its_adapter_and_reads_the_wire_format() -> None:
    job = _job()
    assert job.adapter_id == "dates/3" and parse_adapter_id(job.adapter_id) == ("dates", 3)
    assert (job.accelerator, job.target_repo, job.dataset, job.steps_done, job.total_steps) == (
        "cpu",
        "dates",
        "qa",
        4,
        4,
    )
    assert job.created_at is not None and job.created_at.year == 2026
    assert job.is_final and not _job(status="stopping").is_final


@pytest.mark.parametrize("status", ["completed", "queued", "training", "stopping"])
def test_raise_for_status_returns_a_job_that_has_not_failed(status: str) -> None:
    job = _job(status=status)
    assert job.raise_for_status() is job


def test_an_errored_job_raises_finetuning_error_with_the_jobs_error() -> None:
    with pytest.raises(FinetuningError, match="CUDA out of memory") as caught:
        _job(status="errored", error="CUDA out of memory").raise_for_status()
    error = caught.value
    assert not isinstance(error, FinetuningCanceledError) and isinstance(error, TuneforgeError)
    assert (error.job_uuid, error.adapter_id, error.job_status) == ("j-1", "dates/3", "errored")


def test_a_canceled_job_raises_finetuning_canceled_error() -> None:
    with pytest.raises(FinetuningCanceledError, match=r"dates/3.*canceled") as caught:
        _job(status="canceled").raise_for_status()
    assert isinstance(caught.value, FinetuningError) and caught.value.job_status == "canceled"


@pytest.mark.parametrize(
    ("ref", "parsed"), [("dates/3", ("dates", 3, None)), ("dates/3@40", ("dates", 3, 40))]
)
def test_a_version_or_checkpoint_ref_parses_to_repo_tag_and_step(
    ref: str, parsed: tuple[str, int, int | None]
) -> None:
    assert parse_version_ref(ref) == parsed


@pytest.mark.parametrize("bad", ["dates/3@", "dates/3@x", "dates/3@1@2", "dates@3", "dates/0@3"])
def test_malformed_checkpoint_refs_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match=repr(bad)):
        parse_version_ref(bad)
