"""Typed views of the server's resources, parsed from the camelCase wire format into snake_case attributes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


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
    `format` is the training format detected: `prompt_completion`, `messages` or `text`.
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
    created_at: datetime | None = None
    created_by: str | None = None

    @property
    def id(self) -> str:
        """The adapter id, `repo/tag`, as serving requests and other calls name it."""
        return f"{self.repo}/{self.tag}"
