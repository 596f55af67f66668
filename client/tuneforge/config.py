"""`FinetuningConfig`: the one validated description of a training run, shared by client, API and worker.

It lives in the thin client package (pydantic only) because three places need the same rules: the
client checks a config before sending it, the control plane answers a bad one with a 422 naming the
field, and the worker trains exactly what was accepted. The server depends on this package; this
package depends on nothing of the server.

Fields follow Predibase's snake_case `params` (base_model, adapter, task, epochs, train_steps,
learning_rate, rank, lora_alpha, lora_dropout, target_modules, enable_early_stopping,
apply_chat_template, lr_scheduler, optimizer, warmup_ratio, effective_batch_size), plus the
batch, evaluation, precision, quantisation, auto-configuration and checkpoint settings that
LLaMA-Factory and HF Trainer users expect. Defaults that depend on the base model or the machine
(target modules, context length, dtype) stay `None`/`"auto"` here and are resolved by the worker,
which records the config it actually used on the adapter version.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tuneforge.grpo_config import RewardFunctions, SamplingParams

# The adapter types this release trains.
TRAINED_ADAPTERS = ("lora", "dora", "full", "last_layer", "turbo_lora", "turbo")
# Adapters whose weights are a low-rank delta on a frozen (possibly quantised) base; turbo_lora
# trains speculator heads beside its LoRA.
LOW_RANK_ADAPTERS = ("lora", "dora", "turbo_lora")
# Adapters that train speculator heads (see worker/training/speculator.py): turbo_lora with a LoRA,
# turbo alone on a frozen base (or on a frozen parent LoRA when continuing from one).
TURBO_ADAPTERS = ("turbo_lora", "turbo")
# Adapters whose base weights stay frozen (so may be quantised, and take the LoRA-only options).
FROZEN_BASE_ADAPTERS = (*LOW_RANK_ADAPTERS, "turbo")
MAX_SPECULATOR_HEADS = 8
# Devices one job may train on (all on one worker).
MAX_DEVICES = 16
# Drafts per step by speculator_architecture. An eagle draft conditions each draft on the ones before,
# so a deeper chain keeps paying (bench/turbo_speedup.py measured 6 above 3 on the demo task); a Medusa
# head guesses blind to the others, and its fourth guess is rarely right.
DEFAULT_SPECULATOR_HEADS = {"eagle": 6, "medusa": 3}
# The speculator phase's defaults (see FinetuningConfig.speculator_train_steps): on the demo task the
# accepted length still grew past 300 heads-only steps (bench/turbo_speedup.py), so the cap leaves room.
DEFAULT_SPECULATOR_MAX_STEPS = 500
DEFAULT_SPECULATOR_PATIENCE = 3
DEFAULT_SPECULATOR_EVAL_EVERY = 25

# The projections LoRA targets by default: every linear map of attention and MLP in Llama-style models.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# What a careful practitioner starts from: a low-rank delta tolerates (and needs) a far larger step
# than updating the pretrained weights themselves.
# Speculator heads start at zero and train alone under `turbo`: they take a larger step.
DEFAULT_LEARNING_RATES = {
    "lora": 2e-4,
    "dora": 2e-4,
    "last_layer": 1e-4,
    "full": 2e-5,
    "turbo_lora": 2e-4,
    "turbo": 1e-3,
}
DEFAULT_EFFECTIVE_BATCH_SIZE = 16

# Upper bounds on the fields that size a run's work, so one request cannot ask a worker for years
# of compute or unbounded memory and disk. Each sits well past what demanding LLaMA-Factory /
# Predibase users run, so real work never meets it; a value past it is a 422 naming the field.
# Long fine-tunes run 10k-100k optimizer steps; a million is days of GPU time even at 0.1 s a step.
MAX_STEPS = 1_000_000
# Small datasets are trained for tens of passes, a few-row one for hundreds.
MAX_EPOCHS = 10_000
# Fine-tuning batches are 8-1024 rows; Llama 3's pre-training batch was ~2k sequences of 8k tokens.
MAX_BATCH_ROWS = 16_384
# The longest contexts fine-tuned in practice are 128k tokens (Llama 3.1, Qwen 2.5); twice that.
MAX_SEQ_LENGTH = 262_144
# HF Trainer's save_total_limit is typically 1-5; each full-model checkpoint can be gigabytes.
MAX_KEPT_CHECKPOINTS = 100
# Per evaluation: 200 by default; ten thousand makes a slow eval, a hundred thousand a wasteful one.
MAX_EVAL_SAMPLES = 100_000
# Clock-based cadences (checkpoints, evals): a week, past any job time limit.
MAX_CADENCE_MINUTES = 7 * 24 * 60.0
# Evaluations without improvement before stopping early; more than any run evaluates.
MAX_EARLY_STOPPING_PATIENCE = 10_000
# numpy's and most tools' seed range; larger seeds overflow some RNG APIs.
MAX_SEED = 2**32 - 1
# target_modules: HF ids and module names are short; a model has at most a few hundred module kinds.
MAX_TARGET_MODULES = 512
MAX_NAME_LENGTH = 512

# The training tasks: next-token SFT and continued pretraining, preference tuning (DPO), reinforcement
# fine-tuning with reward functions (GRPO), and sequence classification (a LoRA plus a classification head).
TASKS = ("sft", "continued_pretraining", "dpo", "grpo", "classification")
TaskType = Literal["sft", "continued_pretraining", "dpo", "grpo", "classification"]
# Tasks that train next to a frozen reference (DPO's implicit reward, GRPO's KL term): the reference is
# the base with the adapter switched off, so they take the low-rank adapters only.
REFERENCE_TASKS = ("dpo", "grpo")
# `beta` by task: DPO's temperature of the implicit reward (TRL and the DPO paper use 0.1); GRPO's KL
# coefficient (TRL's GRPO default before 0.19, and Predibase's documented starting point).
DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.04}
# GRPO: completions sampled per prompt (a group); advantages are normalised within it.
DEFAULT_NUM_GENERATIONS = 8
MAX_NUM_GENERATIONS = 64

SchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup"]
OptimizerType = Literal["adamw_torch", "sgd", "adamw_8bit", "paged_adamw_32bit"]


class LrSchedulerConfig(BaseModel):
    """Predibase's `lr_scheduler` object; warm-up length comes from the top-level `warmup_ratio`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: SchedulerType = "linear"
    # cosine only: cosine periods over the run after warm-up; 0.5 decays once from peak to floor.
    num_cycles: float = Field(default=0.5, gt=0, le=100)
    # cosine only: the learning rate never falls below this share of its peak.
    min_lr_ratio: float = Field(default=0.0, ge=0, lt=1)


class OptimizerConfig(BaseModel):
    """Predibase's `optimizer` object."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: OptimizerType = "adamw_torch"
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0, le=1)
    momentum: float = Field(default=0.0, ge=0, lt=1, description="sgd only")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"betas must both be in [0, 1), got {list(value)}")
        return value


class FinetuningConfig(BaseModel):
    """Everything that decides a run's trajectory; a resumed run must be given the same one.

    Every field is optional but `base_model` (which a run continuing from an adapter version
    inherits from it). Validation errors name the field and the accepted values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- Predibase fields -----------------------------------------------------------------------
    base_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="A built-in model, a Hugging Face id (org/name[@revision]), a Predibase catalogue name "
        "(llama-3-1-8b-instruct) or an imported model's name; GET /v2/base-models lists what is available.",
    )
    adapter: str = Field(default="lora", description="lora | dora | full | last_layer | turbo_lora | turbo.")
    task: TaskType = Field(
        default="sft",
        description="sft: learn completions of prompts; continued_pretraining: learn raw text; dpo: learn "
        "from preference pairs; grpo: learn from reward functions; classification: a label per text.",
    )
    epochs: int = Field(default=3, ge=1, le=MAX_EPOCHS, description="Passes over the training rows.")
    train_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Exactly this many optimizer steps (cycling epochs); wins over epochs.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        validate_default=True,
        description="Default by adapter: lora/dora/turbo_lora 2e-4, turbo 1e-3, last_layer 1e-4, full 2e-5.",
    )
    rank: int | Literal["auto"] = Field(
        default=16, description="LoRA rank, or 'auto' to size each module from its gradient's spectrum."
    )
    lora_alpha: int | Literal["auto"] | None = Field(
        default=None, validate_default=True, description="Default 2 * rank; 'auto' follows per-module ranks."
    )
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: tuple[str, ...] | None = Field(
        default=None,
        max_length=MAX_TARGET_MODULES,
        description="None: every attention and MLP projection the base model has.",
    )
    enable_early_stopping: bool = Field(
        default=True, description="Stop when eval loss has not improved for early_stopping_patience evals."
    )
    apply_chat_template: bool | None = Field(
        default=None, description="None: wrap prompt/completion rows in the template when the model has one."
    )
    lr_scheduler: LrSchedulerConfig = Field(
        default_factory=LrSchedulerConfig,
        description="type (linear | cosine | constant | ...), num_cycles, ...",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="type (adamw_torch | sgd | ...), weight_decay, betas, ...",
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, lt=1, description="Share of the steps over which the rate rises from 0."
    )
    effective_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BATCH_ROWS,
        description="Rows per optimizer step; default 16 (or micro * accumulation).",
    )

    # --- batch, evaluation and precision ----------------------------------------------------------
    micro_batch_size: int = Field(default=4, ge=1, le=4096, description="Rows per forward pass.")
    eval_batch_size: int | None = Field(default=None, ge=1, le=4096, description="Default: micro_batch_size.")
    gradient_accumulation_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BATCH_ROWS,
        description="Derived from effective_batch_size / micro_batch_size when absent.",
    )
    eval_every_n_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="Default: at each checkpoint, and always at the end."
    )
    eval_every_n_minutes: float | None = Field(
        default=None, gt=0, le=MAX_CADENCE_MINUTES, description="Also evaluate on this clock."
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description="Rows held out for eval when there is no `split` column; 0: none.",
    )
    max_eval_samples: int = Field(
        default=200, ge=1, le=MAX_EVAL_SAMPLES, description="Eval rows scored at most, per evaluation."
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 where the device computes it natively, else fp32."
    )
    quantization_bits: Literal[4, 8] | None = Field(
        default=None, description="4 (nf4, QLoRA) or 8 (LLM.int8) bit frozen base; lora/dora only."
    )
    layer_selection_percentage: float | None = Field(
        default=None, gt=0, le=1, description="Train adapters only on this top share of layers by importance."
    )
    n_test_samples: int = Field(
        default=32, ge=1, le=4096, description="Training rows scored to choose layers and automatic ranks."
    )

    # --- sequence, memory and checkpoints -----------------------------------------------------------
    max_seq_length: int | None = Field(
        default=None,
        ge=8,
        le=MAX_SEQ_LENGTH,
        description="Longer rows are truncated (and counted); default min(context, 2048).",
    )
    packing: bool = Field(
        default=True, description="Several rows per sequence, each attending only to itself (no padding)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, slower steps."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradients are clipped to this global norm.")
    num_devices: int = Field(
        default=1,
        ge=1,
        le=MAX_DEVICES,
        description="Devices (GPUs) of one worker the job trains on, one process each; the global batch, "
        "and so the trajectory, is the same on any count (the worker may cap it at what it has).",
    )
    checkpoint_every_n_steps: int = Field(
        default=50,
        ge=1,
        le=MAX_STEPS,
        description="A restartable checkpoint every this many optimizer steps.",
    )
    checkpoint_every_n_minutes: float | None = Field(
        default=None, gt=0, le=MAX_CADENCE_MINUTES, description="And on this clock."
    )
    keep_n_checkpoints: int = Field(
        default=3, ge=1, le=MAX_KEPT_CHECKPOINTS, description="Older checkpoints are deleted."
    )
    load_best_at_end: bool = Field(
        default=True, description="The stored adapter is the lowest-eval-loss one."
    )
    early_stopping_patience: int = Field(
        default=5, ge=1, le=MAX_EARLY_STOPPING_PATIENCE, description="Evaluations without improvement."
    )
    seed: int = Field(
        default=42, ge=0, le=MAX_SEED, description="Seeds data order, splits, dropout and initialisation."
    )

    # --- preference and reinforcement tasks (dpo / grpo) --------------------------------------------
    beta: float | None = Field(
        default=None,
        gt=0,
        le=100,
        validate_default=True,
        description="dpo: temperature of the implicit reward (default 0.1); grpo: weight of the KL term to "
        "the reference (default 0.04). Other tasks: unused.",
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="dpo: assumed share of flipped preference labels (cDPO)."
    )
    num_generations: int = Field(
        default=DEFAULT_NUM_GENERATIONS,
        ge=2,
        le=MAX_NUM_GENERATIONS,
        description="grpo: completions sampled per prompt; advantages are normalised within each group.",
    )
    sampling_params: SamplingParams = Field(
        default_factory=SamplingParams, description="grpo: temperature, top_p, top_k, max_tokens of rollouts."
    )
    reward_fns: RewardFunctions | None = Field(
        default=None,
        description="grpo: {functions: {name: {encodedFn: base64 source}}, runtime: {packages}}; the "
        "Predibase SDK's GRPOConfig(reward_fns=[...]) sends this.",
    )
    clip_epsilon: float = Field(
        default=0.2, gt=0, le=1, description="grpo: the policy ratio is clipped to [1 - eps, 1 + eps]."
    )

    # --- speculator heads (turbo_lora / turbo) ------------------------------------------------------
    speculator_architecture: Literal["eagle", "medusa"] = Field(
        default="eagle",
        description="eagle: a one-layer draft model over the model's own hidden states that attends to the "
        "context and to its earlier drafts (measured better: bench/turbo_speedup.py); medusa: independent "
        "residual heads on the last hidden state.",
    )
    speculator_heads: int = Field(
        default=None,  # type: ignore[assignment]  # filled by _heads_for_the_architecture
        validate_default=True,
        description="Drafts proposed per step: Medusa heads (head k predicts k+1 tokens past the next) or "
        f"the eagle draft's depth (1..{MAX_SPECULATOR_HEADS}). Default by architecture: eagle "
        f"{DEFAULT_SPECULATOR_HEADS['eagle']}, medusa {DEFAULT_SPECULATOR_HEADS['medusa']}.",
    )
    speculator_loss_weight_decay: float = Field(
        default=0.8, gt=0, le=1, description="Head k's loss weighs decay**k (k from 0)."
    )
    speculator_distill: bool = Field(
        default=False, description="Heads learn the model's own greedy tokens instead of the dataset's."
    )
    # The speculator phase: after the model's steps, the heads alone train on the frozen (published)
    # model's own greedy tokens, judged by the accepted length serving would get on held-out prompts.
    speculator_train_steps: int | None = Field(
        default=None,
        ge=0,
        le=MAX_STEPS,
        description="Steps of the speculator phase (0: none). Default: until the held-out accepted length "
        "stops improving (speculator_patience evaluations, at most speculator_max_steps).",
    )
    speculator_max_steps: int = Field(
        default=DEFAULT_SPECULATOR_MAX_STEPS,
        ge=1,
        le=MAX_STEPS,
        description="The speculator phase's cap when it stops by itself.",
    )
    speculator_patience: int = Field(
        default=DEFAULT_SPECULATOR_PATIENCE,
        ge=1,
        le=MAX_EARLY_STOPPING_PATIENCE,
        description="Speculator evaluations without a better accepted length before the phase stops.",
    )
    speculator_eval_every: int = Field(
        default=DEFAULT_SPECULATOR_EVAL_EVERY,
        ge=1,
        le=MAX_STEPS,
        description="Speculator-phase steps between measurements of the held-out accepted length.",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_predibase_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("lr_scheduler"), str):
            data["lr_scheduler"] = {"type": data["lr_scheduler"]}
        if isinstance(data.get("optimizer"), str):
            data["optimizer"] = {"type": data["optimizer"]}
        if data.get("quantization_bits") in ("none", "None", 0):
            data["quantization_bits"] = None
        # A plain "4"/"8" from a CLI `--set` or a YAML file.
        if isinstance(data.get("quantization_bits"), str) and data["quantization_bits"].isdigit():
            data["quantization_bits"] = int(data["quantization_bits"])
        # The Predibase SDK serialises GRPOConfig.reward_fns by its alias, and leaves unset fields null.
        if "rewardFns" in data:
            data.setdefault("reward_fns", data.pop("rewardFns"))
        for name in ("beta", "num_generations", "sampling_params"):
            if name in data and data[name] is None:
                del data[name]
        if data.get("secrets"):
            raise ValueError(
                "secrets: reward functions run in a sandbox without network or credentials, so secrets are "
                "not passed to them; remove secrets"
            )
        data.pop("secrets", None)
        return data

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, value: str) -> str:
        if value in TRAINED_ADAPTERS:
            return value
        if value == "qlora":
            raise ValueError("use adapter 'lora' (or 'dora') with quantization_bits 4 for QLoRA")
        raise ValueError(f"unknown adapter {value!r}: use one of {', '.join(TRAINED_ADAPTERS)}")

    @field_validator("speculator_heads", mode="before")
    @classmethod
    def _heads_for_the_architecture(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return DEFAULT_SPECULATOR_HEADS[info.data.get("speculator_architecture", "eagle")]
        return value

    @field_validator("speculator_heads")
    @classmethod
    def _heads_in_range(cls, value: int) -> int:
        if not 1 <= value <= MAX_SPECULATOR_HEADS:
            raise ValueError(f"speculator_heads must be between 1 and {MAX_SPECULATOR_HEADS}, got {value}")
        return value

    @field_validator("beta")
    @classmethod
    def _beta_for_the_task(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return DEFAULT_BETA.get(info.data.get("task", "sft"))
        return value

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate_for_the_adapter(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and "adapter" in info.data:
            return DEFAULT_LEARNING_RATES[info.data["adapter"]]
        return value

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_in_range(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 1024:
            raise ValueError(f"rank must be between 1 and 1024 or 'auto', got {value}")
        return value

    @field_validator("lora_alpha")
    @classmethod
    def _alpha_follows_rank(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"lora_alpha must be at least 1, got {value}")
        # An invalid rank is reported on its own field; leave alpha unset rather than guess.
        if value is None and "rank" in info.data:
            rank = info.data["rank"]
            return "auto" if rank == "auto" else 2 * int(rank)
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets_non_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not all(name.strip() for name in value)):
            raise ValueError("target_modules must name at least one module, or be null for the default")
        if value is not None and any(len(name) > MAX_NAME_LENGTH for name in value):
            raise ValueError(f"target_modules: each name must be at most {MAX_NAME_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FinetuningConfig:
        problems = self._batch_problems() + self._method_problems() + self._task_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _batch_problems(self) -> list[str]:
        micro, accumulation, effective = (
            self.micro_batch_size,
            self.gradient_accumulation_steps,
            self.effective_batch_size,
        )
        if effective is not None and effective < micro:
            return [f"effective_batch_size ({effective}) must be at least micro_batch_size ({micro})"]
        if (
            effective is not None
            and accumulation is not None
            and math.ceil(effective / micro) != accumulation
        ):
            return [
                f"gradient_accumulation_steps ({accumulation}) disagrees with effective_batch_size "
                f"({effective}) / micro_batch_size ({micro}); set only one of the two"
            ]
        return []

    def _method_problems(self) -> list[str]:
        problems = []
        low_rank = self.adapter in FROZEN_BASE_ADAPTERS
        if self.quantization_bits is not None and not low_rank:
            problems.append(
                f"quantization_bits: a {self.quantization_bits}-bit base cannot be trained directly; use "
                f"adapter 'lora' or 'dora' (QLoRA), or drop quantization_bits for adapter '{self.adapter}'"
            )
        if self.layer_selection_percentage is not None and not low_rank:
            problems.append("layer_selection_percentage applies to adapter 'lora' or 'dora' only")
        if self.rank == "auto" and not low_rank:
            problems.append(f"rank 'auto' applies to adapter 'lora' or 'dora', not '{self.adapter}'")
        if self.lora_alpha == "auto" and self.rank != "auto":
            problems.append("lora_alpha 'auto' follows rank 'auto'; give an integer alpha for a fixed rank")
        if self.dtype == "fp16" and self.quantization_bits == 8:
            problems.append("dtype fp16 with quantization_bits 8 is not supported; use dtype auto or bf16")
        return problems + self._device_problems()

    def _task_problems(self) -> list[str]:
        task = self.task
        if task in ("sft", "continued_pretraining"):
            return []
        problems = []
        if self.adapter not in ("lora", "dora"):
            why = (
                "its reference model is the base with the adapter switched off"
                if task in REFERENCE_TASKS
                else "it trains a LoRA beside a classification head"
            )
            problems.append(
                f"adapter: task '{task}' trains adapter 'lora' or 'dora' ({why}), not '{self.adapter}'"
            )
        if self.num_devices != 1:
            problems.append(f"num_devices: task '{task}' trains on one device; set num_devices to 1")
        if self.rank == "auto" or self.layer_selection_percentage is not None:
            problems.append(
                "rank 'auto' and layer_selection_percentage apply to tasks sft and continued_pretraining, "
                f"not '{task}'"
            )
        if task == "grpo" and self.adapter != "lora":
            problems.append(
                f"adapter: task 'grpo' samples its rollouts with the serving engine, which serves LoRA "
                f"adapters; use adapter 'lora', not '{self.adapter}'"
            )
        if task == "grpo" and self.quantization_bits is not None:
            problems.append(
                "quantization_bits: task 'grpo' samples rollouts from the full-precision base, so the policy "
                "it trains must be that base too; drop quantization_bits"
            )
        if task == "grpo" and self.reward_fns is None:
            problems.append("reward_fns: task 'grpo' needs at least one reward function")
        if task != "grpo" and self.reward_fns is not None:
            problems.append(f"reward_fns: only task 'grpo' takes reward functions, not '{task}'")
        return problems

    def _device_problems(self) -> list[str]:
        if self.num_devices == 1:
            return []
        if self.adapter in TURBO_ADAPTERS:
            return [
                f"num_devices: adapter '{self.adapter}' trains its speculator on one device; "
                "set num_devices to 1"
            ]
        if self.accumulation_steps < self.num_devices:
            return [
                f"num_devices: {self.num_devices} devices need at least {self.num_devices} micro-batches per "
                f"step, and effective_batch_size ({self.batch_size}) / micro_batch_size "
                f"({self.micro_batch_size}) gives {self.accumulation_steps}; lower micro_batch_size"
            ]
        return []

    # --- derived values --------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Rows per optimizer step (effective_batch_size after defaults)."""
        if self.effective_batch_size is not None:
            return self.effective_batch_size
        if self.gradient_accumulation_steps is not None:
            return self.micro_batch_size * self.gradient_accumulation_steps
        return max(DEFAULT_EFFECTIVE_BATCH_SIZE, self.micro_batch_size)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (the last one of a step may be smaller)."""
        return math.ceil(self.batch_size / self.micro_batch_size)

    @property
    def eval_micro_batch_size(self) -> int:
        """Rows per evaluation forward pass: eval_batch_size, else micro_batch_size."""
        return self.eval_batch_size or self.micro_batch_size

    def trajectory_fields(self) -> dict[str, object]:
        """The fields a resumed run must share with its checkpoint to continue the same trajectory."""
        return self.model_dump(
            mode="json",
            exclude={
                "checkpoint_every_n_steps",
                "checkpoint_every_n_minutes",
                "keep_n_checkpoints",
                "max_eval_samples",
                "eval_batch_size",
                "eval_every_n_minutes",
                "num_devices",  # the trajectory is the same on any device count
            },
        )
