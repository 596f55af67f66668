"""`FinetuningConfig`: the one validated description of a training run, shared by client, API and worker.

It lives in the thin client package (pydantic only) because three places need the same rules: the
client checks a config before sending it, the control plane answers a bad one with a 422 naming the
field, and the worker trains exactly what was accepted. The server depends on this package; this
package depends on nothing of the server.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Adapter types the product names but this first cut does not train yet; asking for one must say so
# instead of quietly training plain LoRA.
_LATER_ADAPTERS = ("turbo_lora", "turbo", "dora", "qlora", "full", "last_layer")

# The projections LoRA targets by default: every linear map of attention and MLP in Llama-style models.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuningConfig(BaseModel):
    """Everything that decides a run's trajectory; a resumed run must be given the same one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field(min_length=1)
    adapter: str = "lora"
    task: Literal["sft", "continued_pretraining"] = "sft"
    epochs: int = Field(default=3, ge=1)
    # When set, the run is exactly this many optimizer steps, cycling through epochs as needed.
    train_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    rank: int = Field(default=16, ge=1, le=1024)
    # Declared after `rank` so that its validator can see the validated rank.
    lora_alpha: int | None = Field(default=None, ge=1, validate_default=True)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = None
    micro_batch_size: int = Field(default=4, ge=1)
    effective_batch_size: int = Field(default=16, ge=1)
    max_seq_length: int = Field(default=512, ge=8)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    # Predibase sends `{"type": "cosine", ...}`; the plain name is accepted too.
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=42, ge=0)
    checkpoint_every_n_steps: int = Field(default=50, ge=1)
    # None: wrap prompt/completion rows in the chat template when the tokenizer has one.
    apply_chat_template: bool | None = None
    # Share of rows held out for evaluation when the dataset has no `split` column; 0 disables it.
    eval_fraction: float = Field(default=0.1, ge=0, le=0.5)
    max_eval_samples: int = Field(default=200, ge=1)

    @field_validator("adapter")
    @classmethod
    def _only_lora_for_now(cls, value: str) -> str:
        if value == "lora":
            return value
        if value in _LATER_ADAPTERS:
            raise ValueError(
                f"adapter {value!r} is not supported yet: this release trains 'lora' only; "
                f"{', '.join(repr(a) for a in _LATER_ADAPTERS)} come in a later release"
            )
        raise ValueError(f"unknown adapter {value!r}: use 'lora'")

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _scheduler_from_predibase_dict(cls, value: object) -> object:
        if isinstance(value, dict):
            extra = sorted(set(value) - {"type"})
            if extra:
                raise ValueError(f"only 'type' is supported inside lr_scheduler, not {', '.join(extra)}")
            return value.get("type")
        return value

    @field_validator("lora_alpha")
    @classmethod
    def _alpha_defaults_to_twice_rank(cls, value: int | None, info: ValidationInfo) -> int | None:
        # An invalid rank is reported on its own field; leave alpha unset rather than guess.
        if value is None and "rank" in info.data:
            return 2 * int(info.data["rank"])
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets_non_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not all(name.strip() for name in value)):
            raise ValueError("target_modules must name at least one module, or be null for the default")
        return value

    @field_validator("effective_batch_size")
    @classmethod
    def _effective_at_least_micro(cls, value: int, info: ValidationInfo) -> int:
        micro = info.data.get("micro_batch_size")
        if micro is not None and value < micro:
            raise ValueError(f"effective_batch_size ({value}) must be at least micro_batch_size ({micro})")
        return value

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (the last one of a step may be smaller)."""
        return math.ceil(self.effective_batch_size / self.micro_batch_size)

    def trajectory_fields(self) -> dict[str, object]:
        """The fields a resumed run must share with its checkpoint to continue the same trajectory."""
        return self.model_dump(mode="json", exclude={"checkpoint_every_n_steps", "max_eval_samples"})
