"""The speculator config a Turbo adapter stores beside its weights: written by training, read by serving."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.rules.artifacts import SPECULATOR_CONFIG

SPECULATOR_FORMAT = 1
# The tensor in speculator.safetensors holding the draft vocabulary (token ids drafts are chosen among).
DRAFT_VOCAB_KEY = "draft_vocab"
# Far above any trained depth (Medusa uses 3-5 heads); a config past it is not a speculator.
MAX_DRAFT_HEADS = 64


class SpeculatorArchitecture(StrEnum):
    """What kind of draft a speculator is, as its config names it on disk."""

    MEDUSA = "medusa_residual_silu"  # residual heads on the last hidden state, through the LM head
    EAGLE = "eagle_layer"  # one decoder layer drafting from hidden states and token embeddings

    @classmethod
    def of_choice(cls, choice: str) -> SpeculatorArchitecture:
        """The architecture FinetuningConfig's `speculator_architecture` ("eagle" or "medusa") names."""
        return {"eagle": cls.EAGLE, "medusa": cls.MEDUSA}[choice]


class SpeculatorConfigError(ValueError):
    """A speculator config that does not validate; the message names the field."""


class SpeculatorConfig(BaseModel):
    """What a serving engine needs to rebuild the draft; stamped with a format version on disk.

    Keys this release does not know (from a newer writer) are ignored.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    hidden_size: int = Field(ge=1)
    num_heads: int = Field(default=3, ge=1, le=MAX_DRAFT_HEADS)
    loss_weight_decay: float = 0.8  # head k's loss weighs decay**k
    distill: bool = False  # heads trained on the model's own greedy tokens
    architecture: SpeculatorArchitecture = SpeculatorArchitecture.MEDUSA
    shares_lm_head: bool = True  # logits = base LM head(...); no speculator has a vocabulary matrix
    base_model: str | None = None
    format: int = SPECULATOR_FORMAT
    # eagle_layer only: the base model's layer shape, which the draft layer copies.
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rms_norm_eps: float | None = None

    @property
    def loss_weights(self) -> list[float]:
        return [self.loss_weight_decay**k for k in range(self.num_heads)]

    @classmethod
    def parse(cls, raw: Any) -> SpeculatorConfig:
        """A config from its JSON value, or SpeculatorConfigError naming the first bad field."""
        if not isinstance(raw, dict):
            raise SpeculatorConfigError(f"{SPECULATOR_CONFIG} is not a JSON object")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise SpeculatorConfigError(f"{SPECULATOR_CONFIG}: {field}: {error['msg']}") from None

    def save(self, directory: Path) -> None:
        (directory / SPECULATOR_CONFIG).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SpeculatorConfig:
        return cls.parse(json.loads((directory / SPECULATOR_CONFIG).read_text()))
