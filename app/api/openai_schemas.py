"""Request and response shapes of the OpenAI-compatible routes (files, fine-tuning jobs, models).

Field names and types follow the `openai` SDK's types (openai/types/file_object.py,
openai/types/fine_tuning/); every field a caller sends is bounded.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from tuneforge.config import MAX_BATCH_ROWS, MAX_EPOCHS, MAX_NAME_LENGTH, MAX_SEED

T = TypeVar("T")
# The learning rate is the adapter's default times this; past 100x a LoRA diverges at once.
MAX_LR_MULTIPLIER = 100.0
# DPO's beta: TRL and the DPO paper use 0.1; values past 10 make the reference term vanish.
MAX_BETA = 10.0
MAX_FILE_ID_CHARS = 64
MAX_SUFFIX_CHARS = 64  # OpenAI's own limit
MAX_METADATA_KEYS = 16  # OpenAI's limits: 16 pairs, keys of 64 and values of 512 characters
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _auto_or_number(integer: bool, low: float, high: float) -> Any:
    """A check of `"auto"` or a number in (low, high] (integers: [low, high]) with one message: a plain
    union would report each branch's failure, naming the field twice over."""
    kind = "an integer" if integer else "a number"
    bounds = f"from {low:g} to {high:g}" if integer else f"above {low:g} and at most {high:g}"

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        number_types = (int,) if integer else (int, float)
        in_range = isinstance(value, number_types) and not isinstance(value, bool)
        in_range = in_range and (low <= value if integer else low < value) and value <= high
        if not in_range:
            raise ValueError(f"must be 'auto' or {kind} {bounds}; got {str(value)[:40]!r}")
        return value if integer else float(value)

    return PlainValidator(check)


def _schema(integer: bool, low: float, high: float) -> WithJsonSchema:
    number: dict[str, Any] = {"type": "integer" if integer else "number", "maximum": high}
    number |= {"minimum": low} if integer else {"exclusiveMinimum": low}
    return WithJsonSchema({"anyOf": [number, {"const": "auto", "type": "string"}]})


Epochs = Annotated[int | str, _auto_or_number(True, 1, MAX_EPOCHS), _schema(True, 1, MAX_EPOCHS)]
BatchSize = Annotated[int | str, _auto_or_number(True, 1, MAX_BATCH_ROWS), _schema(True, 1, MAX_BATCH_ROWS)]
LrMultiplier = Annotated[
    float | str, _auto_or_number(False, 0, MAX_LR_MULTIPLIER), _schema(False, 0, MAX_LR_MULTIPLIER)
]
Beta = Annotated[float | str, _auto_or_number(False, 0, MAX_BETA), _schema(False, 0, MAX_BETA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate_multiplier: LrMultiplier | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Beta | None = None


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    # Accepted only to be refused with a message naming what is supported.
    reinforcement: dict[str, Any] | None = Field(default=None, max_length=32)


class JobCreate(_Strict):
    model: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    training_file: str = Field(min_length=1, max_length=MAX_FILE_ID_CHARS)
    validation_file: str | None = Field(default=None, max_length=MAX_FILE_ID_CHARS)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=MAX_SUFFIX_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    metadata: (
        dict[
            Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
            Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)],
        ]
        | None
    ) = Field(default=None, max_length=MAX_METADATA_KEYS)
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=16)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class CursorList(BaseModel, Generic[T]):
    """OpenAI's cursor page: the SDK asks for the next page `after` the last item's id while `has_more`."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = []
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
