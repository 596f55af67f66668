"""Wire schemas of deployments, in the Predibase v2 shape the SDK's `Deployment` model validates."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.api.schemas import WireModel


class DeploymentCreate(WireModel):
    name: str
    # camelCase keys as the SDK sends them (baseModel, minReplicas, preloadedAdapters, ...).
    config: dict[str, Any]
    description: str | None = None


class DeploymentUpdate(WireModel):
    config: dict[str, Any] | None = None
    description: str | None = None


class DeploymentModel(WireModel):
    name: str
    max_input_length: int


class Accelerator(WireModel):
    id: str


class DeploymentPublic(WireModel):
    name: str
    uuid: str
    description: str | None
    type: str
    status: str
    model: DeploymentModel
    accelerator: Accelerator
    current_replicas: int
    config: dict[str, Any]
    uses_guaranteed_capacity: bool = False
    created_at: str


class ComputeEvent(BaseModel):
    # Field names as the SDK reads them (not camelCase-aliased: the keys are mixed-case on the wire).
    eventType: str
    timestamp: str
    message: str = ""


class DeploymentEvents(BaseModel):
    ComputeEvents: list[ComputeEvent] = Field(default_factory=list)
    deploymentStatus: str
    name: str


class SpeculativeStatsPublic(WireModel):
    steps: float
    draft_tokens: float
    accepted_tokens: float
    acceptance_rate: float | None


class DeploymentMetricsPublic(WireModel):
    """The serving process's live numbers; all null unless it is ready (looking never starts it)."""

    status: str
    tokens_per_second: float | None
    generated_tokens: float | None
    prompt_tokens: float | None
    requests: float | None
    running_sequences: float | None
    waiting_sequences: float | None
    adapters_in_memory: float | None
    loaded_adapters: list[str]
    speculative: SpeculativeStatsPublic | None
