"""Wire schemas in the Predibase v2 shape: camelCase on the wire, snake_case in Python."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

T = TypeVar("T")


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class SubscriptionPublic(WireModel):
    id: int = 1
    tier: str = "self_hosted"
    is_trial: bool = False
    expiration: str | None = None
    days_remaining_in_plan: int | None = None
    active: bool = True


class TenantPublic(WireModel):
    name: str
    short_code: str
    uuid: str
    subscription: SubscriptionPublic = Field(default_factory=SubscriptionPublic)


class UserPublic(WireModel):
    id: int
    uuid: str
    username: str
    tenant: TenantPublic


# --- datasets ---------------------------------------------------------------------------------


class DatasetUploadBegin(WireModel):
    file_name: str = Field(max_length=1024)
    mime_type: str | None = Field(default=None, max_length=255)
    # Optional (the Predibase SDK omits it): a declared size may get a direct storage URL bound to it.
    size_bytes: int | None = Field(default=None, ge=0, le=5 * 1024**4)


class DatasetUploadBegun(WireModel):
    presigned_url: str
    upload_token: str


class DatasetUploadFinish(WireModel):
    name: str
    upload_token: str


class ConnectionPublic(WireModel):
    type: str = "file"
    name: str


class DatasetPublic(WireModel):
    uuid: str
    name: str
    connection: ConnectionPublic
    status: str
    last_error: str | None
    file_name: str
    format: str | None
    row_count: int | None
    columns: list[str] | None
    split_counts: dict[str, int] | None
    preview: list[dict[str, Any]] | None
    size_bytes: int | None
    sha256: str | None
    created_at: datetime


class DatasetDownloadLink(WireModel):
    url: str
    file_extension: str


class LengthBinPublic(WireModel):
    start: int
    end: int
    count: int


class DatasetLengths(WireModel):
    """Row lengths in approximate tokens (`tokenizer` says how they were counted), binned."""

    rows: int
    min: int
    max: int
    mean: float
    p50: int
    p95: int
    bins: list[LengthBinPublic]
    tokenizer: str


# --- repos and versions -----------------------------------------------------------------------


class RepoCreate(WireModel):
    name: str
    description: str | None = None
    exists_ok: bool = False


class VersionSummary(WireModel):
    tag: int
    created_at: datetime
    created_by: str
    base_model: str
    archived: bool
    status: str
    adapter_type: str


class RepoPublic(WireModel):
    uuid: str
    name: str
    description: str | None
    created_at: datetime
    versions: list[VersionSummary]


class RepoList(WireModel):
    repos: list[RepoPublic]
    count: int


class FinetuningJobRef(WireModel):
    uuid: str | None = None
    error: str | None = None


class AdapterVersionPublic(WireModel):
    uuid: str
    repo: str
    tag: int
    archived: bool
    base_model: str
    status: str
    adapter_type: str
    source: str
    adapter_path: str | None
    description: str | None
    checkpoint: int | None = None
    # The SDK reads finetuningJob.error / .uuid; for an uploaded adapter both are null.
    finetuning_job: FinetuningJobRef = Field(default_factory=FinetuningJobRef)
    config: dict[str, Any]
    metrics_summary: dict[str, Any]
    artifact_files: dict[str, dict[str, Any]]
    # What it continued from: "repo/N", or "repo/N@step" for a checkpoint; null for a fresh start.
    parent_version: str | None = None
    autoconfig: dict[str, Any] = Field(default_factory=dict)
    quality_report: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    created_by: str


class VersionUpdate(WireModel):
    archived: bool | None = None
    description: str | None = None


class AdapterUploadBegin(WireModel):
    repo: str


class AdapterUploadFinish(WireModel):
    upload_token: str


class DataEnvelope(WireModel, Generic[T]):
    """`{data: ...}`: the envelope Predibase's v2 list endpoints use."""

    data: T


# --- fine-tuning jobs --------------------------------------------------------------------------


class FinetuningJobCreate(WireModel):
    params: dict[str, Any]
    dataset: str
    repo: str
    description: str | None = None
    continue_from_version: str | None = None
    # Accepted for SDK compatibility; workers take jobs from their queue whatever the spec says.
    compute_spec: dict[str, Any] | None = None


class AcceleratorPublic(WireModel):
    id: str


class FinetuningJobPublic(WireModel):
    uuid: str
    base_model: str
    dataset_name: str
    target_repo_name: str
    target_version_tag: int
    accelerator: AcceleratorPublic
    status: str
    params: dict[str, Any]
    description: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    steps_done: int
    total_steps: int | None
    worker_id: str | None
    continue_from_version: str | None = None
    # Placement by memory: the estimate (totalBytes, parts...) and the worker class chosen, if any.
    placement: dict[str, Any] | None = None
    worker_class: str | None = None


class JobMetricPublic(WireModel):
    step: int
    epoch: float | None
    train_loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    tokens: int | None
    checkpoint_number: int | None
    grad_norm: float | None = None
    eval_perplexity: float | None = None
    tokens_per_second: float | None = None
    useful_tokens: int | None = None
    peak_rss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    gpu_utilization: float | None = None
    # The task's own metrics (dpo reward accuracy, grpo rewards per function and KL, classification accuracy).
    task_metrics: dict[str, float] | None = None


class CostEstimate(WireModel):
    """Self-hosted training has no per-job price; the estimate says how much work the job is."""

    estimated_cost: float = 0.0
    estimated_duration: str | None = None
    total_steps: int | None = None
    note: str = "self-hosted: no per-job charge; cost is your own GPU time"


class BaseModelPublic(WireModel):
    """A base model this cluster has: what a job's `base_model` or a deployment's `baseModel` may name."""

    name: str
    description: str
    builtin: bool
    source: str  # builtin | store | hf-cache | local
    architecture: str | None = None  # config.json's model_type; None where the control plane cannot read it
    parameter_count: int | None = None
    context_length: int | None = None
    servable: bool  # whether tuneforge's serving engine runs this architecture (any model can be trained)
    chat_template: bool | None = None


# Past this a page offset is a mistake, not a page: without a bound, 2**63 reaches the database
# and fails there (a 500) instead of here (a 422 naming `offset`).
MAX_PAGE_OFFSET = 2**31 - 1


class ListEnvelope(WireModel, Generic[T]):
    """`{data: [...], count}`: a page of a list and the total."""

    data: list[T]
    count: int
