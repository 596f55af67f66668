"""Owns everything before the first step: the config resolved for this model and machine, the tokenised
data (from the cache when it can), the automatic layer/rank decisions, the model, optimiser and schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from tuneforge.config import LOW_RANK_ADAPTERS, TURBO_ADAPTERS
from tuneforge.rules.artifacts import ADAPTER_CONFIG, CLASSIFIER_LABELS, SPECULATOR_WEIGHTS
from tuneforge.rules.classifier import ClassifierLabelsError, parse_labels

from worker.training import autoconfig, methods, optim, token_cache
from worker.training.config import TrainingConfig
from worker.training.data import Example, PreparedData
from worker.training.draft_replay import HeldOutText
from worker.training.feature_cache import FeatureCache
from worker.training.methods import TrainableModel
from worker.training.runtime import Runtime, TrainingConfigError, resolve_runtime
from worker.training.task import LanguageModelingTask, TrainingTask, task_for
from worker.training.world import World

if TYPE_CHECKING:
    from worker.training.grpo_rollouts import RolloutSampler
    from worker.training.reward_sandbox import SandboxLimits

# Longer contexts than this rarely help fine-tuning and cost memory quadratically in attention.
DEFAULT_MAX_SEQ_LENGTH = 2048


@dataclass
class Run:
    """One run's model, optimiser and data, ready to step."""

    config: TrainingConfig  # with every default resolved: what the run actually uses
    task: TrainingTask  # what a step minimises and how the model is judged (worker/training/task.py)
    trainable: TrainableModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: PreparedData  # train/eval hold the task's examples (`Example` for next-token tasks)
    pad_token_id: int
    steps_per_epoch: int
    total_steps: int
    autoconfig: dict[str, Any] = field(default_factory=dict)  # the automatic decisions, JSON
    requested_trajectory: dict[str, Any] = field(default_factory=dict)  # as given, to match on resume
    best_state: dict[str, torch.Tensor] | None = None  # trainable weights at the best eval so far
    # turbo: the frozen model's features of the training examples, built by the first step this process runs
    features: FeatureCache | None = None
    features_built: bool = False
    phase_steps: int = 0  # the steps the current phase plans (the model's: total_steps)
    # The speculator phase's held-out texts (worker/training/draft_replay.py), computed once per process.
    replay_texts: list[HeldOutText] | None = None
    world: World = field(default_factory=World)  # this process among the run's (one device: World())

    @property
    def device(self) -> torch.device:
        return self.trainable.runtime.device

    def examples_for_step(self, step: int) -> list[Any]:
        """Step -> rows is a pure function of (seed, step): resuming needs only the step number."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.data.train), generator=generator).tolist()
        size = self.config.batch_size
        return [self.data.train[i] for i in order[position * size : (position + 1) * size]]

    def micro_batches(self, examples: Sequence[Any]) -> list[Sequence[Any]]:
        size = self.config.micro_batch_size
        return [examples[i : i + size] for i in range(0, len(examples), size)]


@dataclass(frozen=True)
class Inputs:
    """What the caller hands the run besides the config and rows."""

    model_dir: Path  # the base model's local checkpoint
    trust_remote_code: bool = False  # run the model's own code (auto_map): only for allowed models
    init_from: Path | None = None  # a parent version's artifact (continue_from_version)
    data_cache: token_cache.DataCache | None = None
    dataset_fingerprint: str | None = None  # e.g. the dataset file's sha256; enables the cache
    saved_autoconfig: dict[str, Any] | None = None  # decisions of the checkpoint being resumed
    rollouts: RolloutSampler | None = None  # grpo: samples completions with the policy (worker/rollouts.py)
    reward_limits: SandboxLimits | None = None  # grpo: the reward sandbox's limits (default: SandboxLimits())


def resolve_config(config: TrainingConfig, model_dir: Path, runtime: Runtime) -> TrainingConfig:
    """Every default that depends on the model or the machine, made concrete (and recorded)."""
    model_config = json.loads((model_dir / "config.json").read_text())
    context = int(model_config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LENGTH)
    if config.max_seq_length is not None and config.max_seq_length > context:
        raise TrainingConfigError(
            f"max_seq_length: {config.max_seq_length} is longer than {config.base_model}'s context of "
            f"{context} tokens; use at most {context}"
        )
    return config.model_copy(
        update={
            "max_seq_length": config.max_seq_length or min(context, DEFAULT_MAX_SEQ_LENGTH),
            "effective_batch_size": config.batch_size,
            "gradient_accumulation_steps": config.accumulation_steps,
            "eval_batch_size": config.eval_micro_batch_size,
            "eval_every_n_steps": config.eval_every_n_steps or config.checkpoint_every_n_steps,
            "dtype": runtime.dtype_name,
        }
    )


def load_data(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig,
    inputs: Inputs,
    task: TrainingTask,
) -> PreparedData:
    """The tokenised split: from the cache when an earlier run stored it, else tokenised now.

    Only next-token tasks' examples are cached (the cache's format holds `Example`s).
    """
    if not isinstance(task, LanguageModelingTask):
        return task.prepare(rows, tokenizer, config)
    cache, fingerprint = inputs.data_cache, inputs.dataset_fingerprint
    key = token_cache.cache_key(fingerprint, inputs.model_dir, config) if cache and fingerprint else None
    if cache is not None and key is not None:
        blob = cache.get(key)
        if blob is not None:
            try:
                return token_cache.decode(blob)
            except (ValueError, KeyError):
                pass  # an entry of another format: tokenise again and overwrite it
    data = task.prepare(rows, tokenizer, config)
    if cache is not None and key is not None:
        cache.put(key, token_cache.encode(data))
    return data


def build_run(config: TrainingConfig, rows: Sequence[Mapping[str, Any]], inputs: Inputs) -> Run:
    """The ready-to-step run, before any checkpoint is restored."""
    runtime = resolve_runtime(config.dtype)
    requested = config.trajectory_fields()
    config = resolve_config(config, inputs.model_dir, runtime)
    tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir, trust_remote_code=inputs.trust_remote_code)
    task = task_for(config, inputs)
    data = load_data(rows, tokenizer, config, inputs, task)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    init_adapter, weights_dir = _parent(config, inputs)
    labels = list(data.labels) if data.labels is not None else None
    if labels is not None and init_adapter is not None:
        _check_parent_labels(init_adapter, labels)
    base = methods.load_base(
        weights_dir,
        config,
        runtime,
        trust_remote_code=inputs.trust_remote_code,
        num_labels=len(labels) if labels is not None else None,
    )
    if labels is not None:  # transformers' own forward finds each row's last token by the pad id
        base.config.pad_token_id = pad or 0
    targets = list(config.target_modules) if config.target_modules else methods.default_targets(base)
    methods.check_targets(base, targets)
    config = config.model_copy(update={"target_modules": tuple(targets)})
    decisions = inputs.saved_autoconfig
    if decisions is None:
        decisions = _decide(config, base, data.train, pad or 0) if init_adapter is None else {}
    trainable = methods.build(
        config,
        base,
        tokenizer,
        runtime,
        targets=targets,
        lora_kwargs=decisions.get("lora_kwargs"),
        init_adapter=init_adapter,
        init_speculator=inputs.init_from if config.adapter in TURBO_ADAPTERS else None,
        classifier_labels=labels,
    )
    if trainable.speculator is not None:
        trainable.speculator.set_draft_vocab([example.labels for example in data.train])
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    optimizer = optim.build_optimizer(
        config.optimizer, trainable.named_trainable(), _lr(config), runtime.device
    )
    scheduler = optim.build_scheduler(
        config.lr_scheduler, optimizer, warmup_ratio=config.warmup_ratio, total_steps=total_steps
    )
    # Loss scaling only matters for fp16, whose range underflows small gradients.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype_name == "fp16")
    return Run(
        config,
        task,
        trainable,
        optimizer,
        scheduler,
        scaler,
        data,
        pad or 0,
        steps_per_epoch,
        total_steps,
        autoconfig=decisions,
        requested_trajectory=requested,
        phase_steps=total_steps,
    )


def _lr(config: TrainingConfig) -> float:
    assert config.learning_rate is not None  # the config's validator fills the adapter's default
    return config.learning_rate


def _parent(config: TrainingConfig, inputs: Inputs) -> tuple[Path | None, Path]:
    """(PEFT adapter to continue, directory to load the base weights from)."""
    if inputs.init_from is None:
        return None, inputs.model_dir
    if config.adapter == "turbo":
        # Heads on a frozen parent LoRA (its files are carried into the artifact), or further training
        # of a parent speculator.
        has_adapter = (inputs.init_from / ADAPTER_CONFIG).is_file()
        if not has_adapter and not (inputs.init_from / SPECULATOR_WEIGHTS).is_file():
            raise TrainingConfigError(
                "continue_from_version: the parent version holds neither a PEFT adapter nor a speculator "
                "for adapter 'turbo' to train heads on"
            )
        return (inputs.init_from if has_adapter else None), inputs.model_dir
    if config.adapter in LOW_RANK_ADAPTERS:
        if not (inputs.init_from / ADAPTER_CONFIG).is_file():
            raise TrainingConfigError("continue_from_version: the parent version holds no PEFT adapter")
        return inputs.init_from, inputs.model_dir
    if not (inputs.init_from / "config.json").is_file():
        raise TrainingConfigError(
            f"continue_from_version: the parent holds no whole model to {config.adapter}-tune"
        )
    return None, inputs.init_from


def _check_parent_labels(parent: Path, labels: list[str]) -> None:
    """A classifier continues only from a classifier of the same label set (its head's rows are those)."""
    try:
        parent_labels = parse_labels((parent / CLASSIFIER_LABELS).read_bytes())
    except (OSError, ClassifierLabelsError) as exc:
        raise TrainingConfigError(
            f"continue_from_version: the parent version is no classification adapter ({exc})"
        ) from None
    if parent_labels != labels:
        raise TrainingConfigError(
            f"continue_from_version: the parent classifies into {parent_labels[:10]}, this dataset's train "
            f"split into {labels[:10]}; the label sets must be the same"
        )


def _decide(config: TrainingConfig, base: PreTrainedModel, train: list[Example], pad: int) -> dict[str, Any]:
    """Automatic layer selection and ranks (only when asked for); {} otherwise."""
    wants_auto = config.rank == "auto" or config.layer_selection_percentage is not None
    if config.adapter not in LOW_RANK_ADAPTERS or not wants_auto:
        return {}
    decision = autoconfig.decide(
        base,
        train,
        target_modules=list(config.target_modules or ()),
        rank=config.rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else "auto",
        layer_selection_percentage=config.layer_selection_percentage,
        n_test_samples=config.n_test_samples,
        micro_batch_size=config.micro_batch_size,
        pad_token_id=pad,
        packed=config.packing,
        seed=config.seed,
    )
    return decision.to_json() | {"lora_kwargs": decision.lora_kwargs()}
