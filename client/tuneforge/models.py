"""Typed views of the server's resources, parsed from the camelCase wire format into snake_case attributes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from tuneforge.errors import FinetuningCanceledError, FinetuningError

# A job in one of these states never changes again.
FINAL_JOB_STATUSES = frozenset({"completed", "errored", "canceled"})


class WireModel(BaseModel):
    """Base for every response model.

    Unknown keys are ignored and most fields have defaults, so an older client keeps working
    against a newer server that adds fields.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Connection(WireModel):
    """Where a dataset lives; uploaded files all sit in the `file_uploads` connection."""

    type: str = "file"
    name: str = "file_uploads"


class Dataset(WireModel):
    """An uploaded dataset and what validation found in it.

    `status` is `validating`, `connected` (ready to train on) or `errored` (`last_error` says why).
    `format` is the dataset kind detected (tuneforge.rules.datasets.DatasetKind): `prompt_completion`,
    `messages` or `text` (SFT), `preference` (DPO), `classification` or `prompt` (GRPO).
    """

    uuid: str
    name: str
    connection: Connection = Field(default_factory=Connection)
    status: str
    last_error: str | None = None
    file_name: str | None = None
    format: str | None = None
    row_count: int | None = None
    columns: list[str] | None = None
    split_counts: dict[str, int] | None = None
    preview: list[dict[str, Any]] | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: datetime | None = None

    @property
    def connection_name(self) -> str:
        """The connection's name, as the Predibase SDK's Dataset exposes it."""
        return self.connection.name

    @property
    def ref(self) -> str:
        """`connection/name`: how a dataset is named in fine-tuning requests."""
        return f"{self.connection.name}/{self.name}"


class FinetuningJobRef(WireModel):
    """The job that produced an adapter version; both fields are None for an uploaded adapter."""

    uuid: str | None = None
    error: str | None = None


class VersionSummary(WireModel):
    """One adapter version as listed inside its repo; `id` is the `repo/tag` other calls take."""

    tag: int
    created_at: datetime | None = None
    created_by: str | None = None
    base_model: str | None = None
    archived: bool = False
    status: str | None = None
    adapter_type: str | None = None
    # Not on the wire: filled in from the enclosing repo so that `id` works on its own.
    repo: str | None = None

    @property
    def id(self) -> str:
        """The adapter id, `repo/tag`."""
        return f"{self.repo}/{self.tag}"


class Repo(WireModel):
    """An adapter repository: a name whose versions `repo/1`, `repo/2`, ... are adapters."""

    uuid: str
    name: str
    description: str | None = None
    created_at: datetime | None = None
    versions: list[VersionSummary] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stamp_repo_on_versions(self) -> Repo:
        for version in self.versions:
            version.repo = self.name
        return self


class AdapterVersion(WireModel):
    """One adapter version `repo/tag`: a trained or uploaded PEFT adapter and where it came from."""

    uuid: str
    repo: str
    tag: int
    archived: bool = False
    base_model: str | None = None
    status: str
    adapter_type: str | None = None
    source: str | None = None
    adapter_path: str | None = None
    description: str | None = None
    checkpoint: int | None = None
    finetuning_job: FinetuningJobRef = Field(default_factory=FinetuningJobRef)
    config: dict[str, Any] = Field(default_factory=dict)
    metrics_summary: dict[str, Any] = Field(default_factory=dict)
    artifact_files: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # What it continued from: `repo/tag`, or `repo/tag@step` for a checkpoint; None for a fresh start.
    parent_version: str | None = None
    # The worker's automatic choices (selected layers, per-module ranks) and the adapter's measured
    # quality against its base (exact match, eval loss / perplexity); empty where not recorded.
    autoconfig: dict[str, Any] = Field(default_factory=dict)
    quality_report: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    created_by: str | None = None

    @property
    def id(self) -> str:
        """The adapter id, `repo/tag`, as serving requests and other calls name it."""
        return f"{self.repo}/{self.tag}"


class FinetuningJob(WireModel):
    """A fine-tuning job, training adapter version `target_repo_name/target_version_tag`.

    `status` moves queued → training (→ stopping) → completed | errored | canceled; `error` says
    why an errored job failed. `steps_done` / `total_steps` are its progress (`total_steps` is None
    until the worker has sized the dataset); `attempt` counts restarts after a lost worker.
    """

    uuid: str
    base_model: str
    dataset_name: str | None = None
    target_repo_name: str
    target_version_tag: int
    # `{"id": ...}` on the wire; the id alone here, as the Predibase SDK's FinetuningJob has it.
    accelerator: str | None = None
    status: str
    params: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 0
    steps_done: int = 0
    total_steps: int | None = None
    # The version (`repo/tag`) or checkpoint (`repo/tag@step`) the job continues from, if any.
    continue_from_version: str | None = None
    # Placement by memory: the worker class it was sent to (None: the default queue), and the peak
    # training memory estimate behind the choice (`estimate.total_gib`, `estimate.parts`, ...).
    worker_class: str | None = None
    placement: dict[str, Any] | None = None

    @field_validator("accelerator", mode="before")
    @classmethod
    def _accelerator_id(cls, value: Any) -> Any:
        return value.get("id") if isinstance(value, dict) else value

    @property
    def adapter_id(self) -> str:
        """The adapter id the job trains, `repo/tag`."""
        return f"{self.target_repo_name}/{self.target_version_tag}"

    @property
    def is_final(self) -> bool:
        """True once the job is completed, errored or canceled."""
        return self.status in FINAL_JOB_STATUSES

    def raise_for_status(self) -> FinetuningJob:
        """Raise FinetuningError (carrying the job's error) if the job errored; otherwise return it.

        A canceled job raises FinetuningCanceledError, a FinetuningError too.
        """
        if self.status not in ("errored", "canceled"):
            return self
        names = {"job_uuid": self.uuid, "adapter_id": self.adapter_id, "job_status": self.status}
        what = f"fine-tuning job {self.uuid} ({self.adapter_id})"
        if self.status == "canceled":
            raise FinetuningCanceledError(f"{what} was canceled", **names)
        raise FinetuningError(f"{what} errored: {self.error or 'no error message was recorded'}", **names)

    @property
    def target_repo(self) -> str:
        """The repo's name, under the Predibase SDK's attribute name."""
        return self.target_repo_name

    @property
    def dataset(self) -> str | None:
        """The dataset's name, under the Predibase SDK's attribute name."""
        return self.dataset_name


class JobPhase(WireModel):
    """When a job entered one status (or a restart, or a phase such as `speculator-phase`), as
    `finetuning.jobs.timeline()` reports it, with what the server said about it."""

    started_at: datetime | None = None
    detail: str | None = None


class JobMetric(WireModel):
    """The metrics a job recorded at one optimizer step; a value is None where it was not measured.

    `tokens` counts every token through the model (padding too), `useful_tokens` the non-padding
    ones trained on so far; memory is in bytes and `gpu_utilization` in percent.
    """

    step: int
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens: int | None = None
    checkpoint_number: int | None = None
    grad_norm: float | None = None
    eval_perplexity: float | None = None
    tokens_per_second: float | None = None
    useful_tokens: int | None = None
    peak_rss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    gpu_utilization: float | None = None
    # The task's own metrics (dpo reward accuracy, grpo rewards per function and KL, classification accuracy).
    task_metrics: dict[str, float] | None = None


class _FrameModel(BaseModel):
    """Base of the metrics-stream frames, which keep the Predibase SDK's snake_case keys on the wire."""

    model_config = ConfigDict(extra="ignore")


class MetricsFrameData(_FrameModel):
    """The metrics of one step; every field is None in the frames sent while the job is queued."""

    steps: int | None = None
    checkpoint_number: int | None = None
    train_metrics_loss: float | None = None
    validation_metrics_loss: float | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    total_tokens_used: int | None = None
    # tuneforge's own addition (the Predibase SDK ignores it): the step's training throughput.
    tokens_per_second: float | None = None


class MetricsFrameMeta(_FrameModel):
    """Where the run stands; `is_completed` marks the stream's last frame."""

    is_completed: bool = False
    job_uuid: str | None = Field(default=None, validation_alias="model_uuid")
    run_id: str | None = None
    steps: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    status: str | None = None


class MetricsFrame(_FrameModel):
    """One frame of `GET /v2/finetuning/jobs/{uuid}/metrics/stream`."""

    data: MetricsFrameData = Field(default_factory=MetricsFrameData)
    meta: MetricsFrameMeta = Field(default_factory=MetricsFrameMeta)

    @field_validator("data", "meta", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value
