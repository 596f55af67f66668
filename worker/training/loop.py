"""Owns one LoRA training run: base model + adapter, the optimiser loop, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from worker.training.base_models import resolve_base_model
from worker.training.config import DEFAULT_TARGET_MODULES, TrainingConfig
from worker.training.data import IGNORE_INDEX, DataStats, Example, collate, prepare_data

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"


class TrainingCallbacks(Protocol):
    """How the caller watches and steers a run; every method is called on the training thread."""

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def should_stop(self) -> bool: ...


class NoCallbacks:
    """Callbacks that watch nothing and never stop; subclass to override only what you need."""

    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    total_steps: int
    final_train_loss: float | None
    eval_loss_before: float | None  # the base model's, since LoRA starts as the identity
    eval_loss_after: float | None  # None when stopped early or there is no eval split
    truncated_rows: int
    tokens_seen: int
    seconds: float
    stopped: bool
    adapter_dir: Path | None  # output_dir/adapter, written only when the run completes
    last_checkpoint: Path | None
    data: DataStats


@dataclass
class _Progress:
    """What the loop has done so far; saved in each checkpoint as JSON."""

    step: int = 0
    tokens_seen: int = 0
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_step: int | None = None  # the step the last evaluation ran at
    eval_loss: float | None = None


@dataclass
class _Run:
    config: TrainingConfig
    model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: list[Example]
    eval: list[Example]
    pad_token_id: int
    device: torch.device
    steps_per_epoch: int
    total_steps: int

    def examples_for_step(self, step: int) -> list[Example]:
        """Step -> rows is a pure function of (seed, step): resuming needs only the step number."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.train), generator=generator).tolist()
        size = self.config.effective_batch_size
        return [self.train[i] for i in order[position * size : (position + 1) * size]]


def train(
    config: TrainingConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    output_dir: Path,
    cache_dir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on rows; resume_from continues a checkpoint of this same config exactly."""
    started = time.monotonic()
    callbacks = callbacks or NoCallbacks()
    output_dir = Path(output_dir)
    model_dir = resolve_base_model(config.base_model, Path(cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(rows, tokenizer, config)
    run = _build_run(config, model_dir, data.train, data.eval, tokenizer)
    if resume_from is not None:
        progress = _load_checkpoint(run, Path(resume_from))
    else:
        progress = _Progress(eval_loss_before=_evaluate(run))
    last_checkpoint = Path(resume_from) if resume_from is not None else None
    stopped, last_checkpoint = _run_steps(run, progress, callbacks, output_dir, last_checkpoint)
    adapter_dir = None
    if not stopped:
        _record_eval(run, progress, callbacks)
        adapter_dir = output_dir / "adapter"
        _write_atomically(adapter_dir, lambda tmp: _save_adapter(run, tmp))
    return TrainingResult(
        steps=progress.step,
        total_steps=run.total_steps,
        final_train_loss=progress.train_loss,
        eval_loss_before=progress.eval_loss_before,
        eval_loss_after=None if stopped else progress.eval_loss,
        truncated_rows=data.stats.truncated_rows,
        tokens_seen=progress.tokens_seen,
        seconds=time.monotonic() - started,
        stopped=stopped,
        adapter_dir=adapter_dir,
        last_checkpoint=last_checkpoint,
        data=data.stats,
    )


def _run_steps(
    run: _Run, progress: _Progress, callbacks: TrainingCallbacks, output_dir: Path, last: Path | None
) -> tuple[bool, Path | None]:
    """Optimiser steps until done or asked to stop: (stopped, last checkpoint)."""
    saved_at = progress.step if last is not None else None
    while progress.step < run.total_steps:
        if callbacks.should_stop():
            if progress.step > 0 and saved_at != progress.step:
                # No evaluation here: a cancel must be honoured promptly, not after a pass over eval.
                last = _save_checkpoint(run, progress, output_dir, callbacks)
            return True, last
        _train_step(run, progress, callbacks)
        if progress.step % run.config.checkpoint_every_n_steps == 0:
            _record_eval(run, progress, callbacks)
            last, saved_at = _save_checkpoint(run, progress, output_dir, callbacks), progress.step
    return False, last


def _build_run(
    config: TrainingConfig, model_dir: Path, train: list[Example], evaluation: list[Example], tokenizer: Any
) -> _Run:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 halves memory and runs on tensor cores; CPUs here train in fp32 for exactness.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    # transformers types PreTrainedModel.to for a model argument; torch's Module.to is what runs.
    torch.nn.Module.to(base, device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or 2 * config.rank,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules or _default_targets(base)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)  # LoRA A's random init, then dropout: the run's whole RNG stream
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.effective_batch_size)
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _Run(
        config, model, optimizer, scheduler, train, evaluation, pad or 0, device, steps_per_epoch, total_steps
    )


def _default_targets(model: torch.nn.Module) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [name for name in DEFAULT_TARGET_MODULES if name in present]
    if not targets:
        raise ValueError(
            f"target_modules: this model has none of {', '.join(DEFAULT_TARGET_MODULES)}; "
            f"name its linear layers explicitly (it has {', '.join(sorted(present))})"
        )
    return targets


def _token_loss_sum(run: _Run, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over a micro-batch's target tokens, and how many there were."""
    batch = {k: v.to(run.device) for k, v in collate(examples, run.pad_token_id).items()}
    output = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = output.logits  # [B, S, V]
    targets = batch["labels"][:, 1:]  # [B, S-1]: token t predicts token t+1
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _micro_batches(run: _Run, examples: Sequence[Example]) -> list[Sequence[Example]]:
    size = run.config.micro_batch_size
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def _train_step(run: _Run, progress: _Progress, callbacks: TrainingCallbacks) -> None:
    """One optimiser step over effective_batch_size rows, accumulated over micro-batches."""
    examples = run.examples_for_step(progress.step)
    # Normalise by the whole step's target count, so each token weighs the same whatever its micro-batch.
    n_targets = max(1, sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples))
    run.model.train()
    loss_total = 0.0
    for micro in _micro_batches(run, examples):
        loss, _ = _token_loss_sum(run, micro)
        (loss / n_targets).backward()
        loss_total += loss.item()
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    learning_rate = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens_seen += sum(len(e.input_ids) for e in examples)
    progress.train_loss = loss_total / n_targets
    metrics: dict[str, float] = {
        "train_loss": progress.train_loss,
        "learning_rate": float(learning_rate),
        "epoch": progress.step / run.steps_per_epoch,
        "tokens_seen": float(progress.tokens_seen),
        "grad_norm": float(grad_norm),
    }
    callbacks.on_step(progress.step, run.total_steps, metrics)


@torch.no_grad()
def _evaluate(run: _Run) -> float | None:
    """Mean next-token loss over the eval split's target tokens; None without eval rows."""
    if not run.eval:
        return None
    run.model.eval()
    total, count = 0.0, 0
    for micro in _micro_batches(run, run.eval):
        loss, n = _token_loss_sum(run, micro)
        total, count = total + loss.item(), count + n
    run.model.train()
    return total / count if count else None


def _record_eval(run: _Run, progress: _Progress, callbacks: TrainingCallbacks) -> None:
    if progress.eval_step == progress.step:
        return
    progress.eval_step, progress.eval_loss = progress.step, _evaluate(run)
    if progress.eval_loss is not None:
        callbacks.on_eval(progress.step, {"eval_loss": progress.eval_loss})


# --- checkpoints -------------------------------------------------------------------------------


def _save_adapter(run: _Run, directory: Path) -> None:
    # Stamp the name the user gave, not the local cache path, so the adapter is portable.
    run.model.peft_config["default"].base_model_name_or_path = run.config.base_model
    run.model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)


def _save_checkpoint(run: _Run, progress: _Progress, output_dir: Path, callbacks: TrainingCallbacks) -> Path:
    """checkpoints/step-N/: a loadable PEFT adapter plus everything an exact resume needs."""

    def write(tmp: Path) -> None:
        _save_adapter(run, tmp)
        torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(run.device)
        torch.save(rng, tmp / "rng_state.pt")
        epoch, position = divmod(progress.step, run.steps_per_epoch)
        state = {
            "progress": asdict(progress),
            "data_position": {"epoch": epoch, "step_in_epoch": position},
            "total_steps": run.total_steps,
            "config": run.config.trajectory_fields(),
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")

    path = output_dir / "checkpoints" / f"step-{progress.step}"
    _write_atomically(path, write)
    callbacks.on_checkpoint(progress.step, path)
    return path


def _load_checkpoint(run: _Run, path: Path) -> _Progress:
    state = json.loads((path / TRAINER_STATE).read_text())
    expected, saved = run.config.trajectory_fields(), state["config"]
    changed = sorted(k for k in expected.keys() | saved.keys() if expected.get(k) != saved.get(k))
    if changed:
        raise ValueError(f"cannot resume from {path}: the config differs in {', '.join(changed)}")
    set_peft_model_state_dict(run.model, load_file(path / ADAPTER_WEIGHTS, device=str(run.device)))
    run.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=run.device))
    run.scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    rng = torch.load(path / "rng_state.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    return _Progress(**state["progress"])


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a scratch sibling, then rename: a reader never sees a half-written directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    scratch.mkdir()
    try:
        write(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
