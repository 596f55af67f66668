"""GRPO's parts of `FinetuningConfig` (tuneforge/config.py): how rollouts are sampled and the reward
functions, in the wire shape the Predibase SDK's `GRPOConfig` sends (`rewardFns`, `encodedFn`)."""

from __future__ import annotations

import ast
import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# GRPO completions: bounded so a step's rollouts stay a step's work.
DEFAULT_COMPLETION_TOKENS = 128
MAX_COMPLETION_TOKENS = 8192
MAX_REWARD_FUNCTIONS = 16
# A reward function's source, base64 as the Predibase SDK sends it (a real one is a few KB).
MAX_REWARD_SOURCE_CHARS = 64 * 1024


class SamplingParams(BaseModel):
    """GRPO's rollout sampling (Predibase's `sampling_params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature of the rollouts.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=1_000_000, description="None: the whole vocabulary.")
    max_tokens: int = Field(
        default=DEFAULT_COMPLETION_TOKENS,
        ge=1,
        le=MAX_COMPLETION_TOKENS,
        description="Longest completion sampled per rollout.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        # The Predibase SDK sends every field, unset ones as null: null means the default here.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class RewardFunction(BaseModel):
    """One reward function: base64 Python source of `def name(prompt, completion, example) -> float`.

    Untrusted code: the worker runs it only inside the reward sandbox (worker/training/reward_sandbox.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    encoded_fn: str = Field(
        alias="encodedFn", min_length=1, max_length=MAX_REWARD_SOURCE_CHARS, description="base64 source."
    )

    @property
    def source(self) -> str:
        return base64.b64decode(self.encoded_fn).decode("utf-8")

    @field_validator("encoded_fn")
    @classmethod
    def _one_function(cls, value: str) -> str:
        try:
            source = base64.b64decode(value, validate=True).decode("utf-8")
            tree = ast.parse(source)
        except (binascii.Error, UnicodeDecodeError, SyntaxError, ValueError) as exc:
            raise ValueError(f"encodedFn must be base64 of Python source: {exc}") from None
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        if len(tree.body) != 1 or len(functions) != 1:
            raise ValueError(
                "encodedFn must hold exactly one function definition: def name(prompt, completion, example)"
            )
        args = functions[0].args
        if len(args.posonlyargs) + len(args.args) != 3:
            raise ValueError(
                f"reward function {functions[0].name!r} must take 3 arguments: prompt, completion, example"
            )
        return value


class RewardFunctionsRuntime(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    packages: tuple[str, ...] | None = Field(
        default=None,
        max_length=64,
        description="Packages the functions import; each must already be installed on the workers "
        "(nothing is installed per job).",
    )


class RewardFunctions(BaseModel):
    """Predibase's `reward_fns`: named reward functions and their runtime."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: RewardFunctionsRuntime | None = None
    functions: dict[str, RewardFunction] = Field(default_factory=dict, max_length=MAX_REWARD_FUNCTIONS)

    @field_validator("functions")
    @classmethod
    def _names(cls, value: dict[str, RewardFunction]) -> dict[str, RewardFunction]:
        if not value:
            raise ValueError("reward_fns.functions must hold at least one reward function")
        for name in value:
            if not name.isidentifier() or len(name) > 128:
                raise ValueError(
                    f"reward function name {name[:130]!r} must be a Python identifier (at most 128 chars)"
                )
        return value
