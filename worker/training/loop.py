"""Owns one training run end to end: the optimiser loop, evaluation cadence, early stopping, checkpoints,
exact resume, cancel, and the published artifact with its training summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tuneforge.rules.artifacts import TRAINING_SUMMARY

from worker.training import checkpoints, objective, speculator_phase
from worker.training.base_models import local_model_dir
from worker.training.config import TrainingConfig
from worker.training.data import DataStats
from worker.training.evaluation import EvalTracker
from worker.training.preparation import Inputs, Run, build_run
from worker.training.quality import held_out_answers, held_out_prompts
from worker.training.runtime import TrainingConfigError, memory_metrics
from worker.training.speculator_phase import AcceptanceTracker, Budget
from worker.training.task import LanguageModelingTask, build_features
from worker.training.token_cache import DataCache
from worker.training.world import World, micro_batch_rng

if TYPE_CHECKING:
    from worker.training.grpo_rollouts import RolloutSampler
    from worker.training.reward_sandbox import SandboxLimits

SUMMARY_FORMAT = 1
# The phases of a run (_Progress.phase): the model's steps, then for turbo types the heads' alone.
MODEL_PHASE, SPECULATOR_PHASE = "model", "speculator"


class TrainingCallbacks(Protocol):
    """How the caller watches and steers a run; every method is called on the training thread."""

    def on_data(self, stats: DataStats) -> None: ...
    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_phase(self, step: int, phase: str, detail: str) -> None: ...
    def should_stop(self) -> bool: ...


class NoCallbacks:
    """Callbacks that watch nothing and never stop; subclass to override only what you need."""

    def on_data(self, stats: DataStats) -> None: ...
    def on_step(self, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_phase(self, step: int, phase: str, detail: str) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    total_steps: int
    final_train_loss: float | None
    eval_loss_before: float | None  # at the start of this run (the base model, for a fresh adapter)
    eval_loss_after: float | None  # of the published weights; None when stopped or without eval rows
    best_step: int | None  # the step whose weights were published, when load_best_at_end chose them
    early_stopped: bool
    truncated_rows: int
    tokens_seen: int  # tokens through the model, padding included
    useful_tokens: int  # real tokens trained on
    train_seconds: float  # wall time of optimiser steps only (no loading, evaluation or checkpoints)
    seconds: float
    stopped: bool  # canceled through should_stop
    adapter_dir: Path | None  # output_dir/adapter, written only when the run completes
    last_checkpoint: Path | None
    data: DataStats
    model_dir: Path  # the base model's local directory
    # The prompt part of the first few answerable eval rows, for measuring the artifact where it serves.
    held_out_prompts: list[list[int]]
    # (prompt, reference) of the held-out rows the quality report judges (answerable, max_eval_samples).
    held_out_answers: list[tuple[list[int], list[int]]]
    summary: dict[str, Any] = field(default_factory=dict)  # also written as adapter/training_summary.json


@dataclass
class _Progress:
    """What the loop has done so far; saved in each checkpoint as JSON."""

    step: int = 0
    tokens_seen: int = 0
    useful_tokens: int = 0
    train_seconds: float = 0.0
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_step: int | None = None  # the step the last evaluation ran at
    eval_loss: float | None = None
    eval_metrics: dict[str, float] | None = None  # the task's metrics of that evaluation
    early_stopped: bool = False
    # The task's held-out metrics before the first step, which the quality report compares against.
    baseline: dict[str, Any] | None = None
    tracker: EvalTracker = field(default_factory=EvalTracker)
    phase: str = MODEL_PHASE
    published_step: int | None = None  # the model's step whose weights are published (set as it ends)
    speculator: AcceptanceTracker = field(default_factory=AcceptanceTracker)


@dataclass
class _Clock:
    """Wall-clock cadences; not saved: after a resume the minutes count from the restart."""

    last_eval: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)


def train(
    config: TrainingConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    output_dir: Path,
    cache_dir: Path | None = None,
    model_dir: Path | None = None,
    trust_remote_code: bool = False,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    init_from: Path | None = None,
    data_cache: DataCache | None = None,
    dataset_fingerprint: str | None = None,
    world: World | None = None,
    rollouts: RolloutSampler | None = None,
    reward_limits: SandboxLimits | None = None,
) -> TrainingResult:
    """Train on rows; resume_from continues a checkpoint of this same config exactly.

    model_dir: the base model's local directory, resolved by the caller; without it a built-in model
    (or a local directory) named by config.base_model is resolved in cache_dir.
    trust_remote_code: run the model's own code (auto_map); only for models the operator allowed.
    init_from: a parent version's artifact directory to start from (continue_from_version).
    data_cache + dataset_fingerprint: reuse the tokenisation of an earlier run on the same data.
    world: this process's rank in a multi-device run (worker/training/distributed.py starts them);
    callbacks fire on rank 0 only, and only rank 0 writes checkpoints and the artifact.
    rollouts: task grpo's sampler of completions (the caller owns and closes it).
    reward_limits: task grpo's reward sandbox limits (the operator's; default SandboxLimits()).
    """
    started = time.monotonic()
    world = world or World()
    callbacks = (callbacks or NoCallbacks()) if world.is_main else NoCallbacks()
    output_dir = Path(output_dir)
    if config.base_model is None:
        raise ValueError("base_model: required (a continued run inherits its parent's before training)")
    resume = Path(resume_from) if resume_from is not None else None
    saved = _load_checkpoint(config, resume)
    inputs = Inputs(
        model_dir=local_model_dir(config.base_model, model_dir, cache_dir),
        trust_remote_code=trust_remote_code,
        init_from=init_from,
        data_cache=data_cache,
        dataset_fingerprint=dataset_fingerprint,
        saved_autoconfig=saved[1].get("autoconfig") if saved is not None else None,
        rollouts=rollouts,
        reward_limits=reward_limits,
    )
    run = build_run(config, rows, inputs)
    _join(run, world)
    callbacks.on_data(run.data.stats)
    progress = _restore(run, resume, saved[0]) if saved is not None and resume else _fresh_progress(run)
    stopped, last = False, resume
    if progress.phase == MODEL_PHASE:
        stopped, last = _run_steps(run, progress, callbacks, output_dir, last)
        if not stopped:
            _settle_model(run, progress, callbacks)
    if not world.is_main:  # the other ranks publish nothing: rank 0's result is the run's
        return _result(run, progress, inputs, started, stopped=stopped, last_checkpoint=None)
    budget = _budget(run)
    if not stopped and run.trainable.speculator is not None and budget.steps:
        stopped, last = _run_speculator_phase(run, progress, callbacks, output_dir, last, budget)
    if stopped:
        return _result(run, progress, inputs, started, stopped=True, last_checkpoint=last)
    summary = _finish(run, progress, budget)
    adapter_dir = output_dir / "adapter"
    checkpoints.write_atomically(adapter_dir, lambda tmp: _publish(run, tmp, summary))
    return _result(
        run, progress, inputs, started, adapter_dir=adapter_dir, summary=summary, last_checkpoint=last
    )


def _join(run: Run, world: World) -> None:
    """Make `run` one rank of `world`: every rank built the same trainable weights, and starts from rank
    0's values of them (as DDP does)."""
    run.world = world
    if not world.distributed:
        return
    if run.trainable.speculator is not None:
        raise TrainingConfigError(
            f"num_devices: adapter '{run.config.adapter}' trains its speculator on one device; "
            "set num_devices to 1"
        )
    shapes = [(name, tuple(p.shape)) for name, p in run.trainable.named_trainable()]
    world.check_same("set of trainable weights and data", (shapes, run.total_steps, len(run.data.train)))
    world.broadcast([p.data for _, p in run.trainable.named_trainable()])


def _load_checkpoint(
    config: TrainingConfig, resume: Path | None
) -> tuple[checkpoints.TrainerState, dict[str, Any]] | None:
    """The checkpoint to resume from, checked to continue this very run; None for a fresh run."""
    if resume is None:
        return None
    # Read once, on the host: optimizer.load_state_dict moves each state tensor to its parameter's device.
    saved = checkpoints.load(resume, torch.device("cpu"))
    _check_same_trajectory(config, saved[1], resume)
    return saved


def _result(
    run: Run,
    progress: _Progress,
    inputs: Inputs,
    started: float,
    *,
    stopped: bool = False,
    adapter_dir: Path | None = None,
    summary: dict[str, Any] | None = None,
    last_checkpoint: Path | None,
) -> TrainingResult:
    """What the caller learns of the run: a stopped run has no artifact, summary or final eval loss."""
    summary = summary or {}
    # Only next-token tasks' held-out rows are prompts with reference answers that serving can replay.
    next_token = isinstance(run.task, LanguageModelingTask)
    return TrainingResult(
        steps=progress.step,
        total_steps=run.total_steps,
        final_train_loss=progress.train_loss,
        eval_loss_before=progress.eval_loss_before,
        eval_loss_after=None if stopped else progress.eval_loss,
        best_step=summary.get("result", {}).get("published_step"),
        early_stopped=progress.early_stopped,
        truncated_rows=run.data.stats.truncated_rows,
        tokens_seen=progress.tokens_seen,
        useful_tokens=progress.useful_tokens,
        train_seconds=progress.train_seconds,
        seconds=time.monotonic() - started,
        stopped=stopped,
        adapter_dir=adapter_dir,
        last_checkpoint=last_checkpoint,
        data=run.data.stats,
        model_dir=inputs.model_dir,
        held_out_prompts=held_out_prompts(run.data.eval) if next_token else [],
        held_out_answers=held_out_answers(run.data.eval, run.config.max_eval_samples) if next_token else [],
        summary=summary,
    )


def _fresh_progress(run: Run) -> _Progress:
    """A run from step 0, with the baseline the quality report compares to measured before the first step."""
    progress = _Progress()
    progress.baseline = run.task.baseline(run)
    progress.eval_loss_before = (progress.baseline or {}).get("eval_loss")
    return progress


def _run_steps(
    run: Run, progress: _Progress, callbacks: TrainingCallbacks, output_dir: Path, last: Path | None
) -> tuple[bool, Path | None]:
    """The model's optimiser steps until done, out of patience, or asked to stop: (stopped, last
    checkpoint)."""
    config, clock = run.config, _Clock()
    saved_at = progress.step if last is not None else None
    while progress.step < run.total_steps and not progress.early_stopped:
        stop, written = _cancel(run, progress, callbacks, output_dir, saved_at)
        if stop:
            return True, written or last
        _train_step(run, progress, callbacks, run.total_steps)
        now = time.monotonic()
        eval_due = progress.step % (config.eval_every_n_steps or config.checkpoint_every_n_steps) == 0
        if not eval_due and config.eval_every_n_minutes is not None:
            # Rank 0's clock decides: evaluation is a collective every rank must enter together.
            eval_due = run.world.agree(now - clock.last_eval >= 60 * config.eval_every_n_minutes)
        if eval_due:
            _record_eval(run, progress, callbacks)
            clock.last_eval = time.monotonic()
        if _checkpoint_due(config, progress, clock, now) and not progress.early_stopped:
            last, saved_at = _save_checkpoint(run, progress, output_dir, callbacks), progress.step
            clock.last_checkpoint = time.monotonic()
    return False, last


def _run_speculator_phase(
    run: Run,
    progress: _Progress,
    callbacks: TrainingCallbacks,
    output_dir: Path,
    last: Path | None,
    budget: Budget,
) -> tuple[bool, Path | None]:
    """The heads alone, on the frozen published model, until the stopping rule or the budget ends the
    phase (worker/training/speculator_phase.py): (stopped, last checkpoint)."""
    config, clock, tracker = run.config, _Clock(), progress.speculator
    total = progress.step - tracker.steps + budget.steps  # as the progress bar counts: both phases
    if progress.phase == MODEL_PHASE:
        speculator_phase.begin(run, budget.steps)
        progress.phase = SPECULATOR_PHASE
        until = "until the held-out accepted length stops improving, " if budget.stops_itself else ""
        callbacks.on_phase(
            progress.step,
            SPECULATOR_PHASE,
            f"the speculator trains alone on the frozen model {until}at most {budget.steps} steps",
        )
        _observe_acceptance(run, progress)  # the heads as the model's steps left them
    saved_at = progress.step if last is not None else None
    while tracker.steps < budget.steps and tracker.stop_reason is None:
        stop, written = _cancel(run, progress, callbacks, output_dir, saved_at)
        if stop:
            return True, written or last
        before = progress.train_seconds
        _train_step(run, progress, callbacks, total)
        tracker.steps, tracker.seconds = tracker.steps + 1, tracker.seconds + progress.train_seconds - before
        if tracker.steps % config.speculator_eval_every == 0 or tracker.steps == budget.steps:
            _observe_acceptance(run, progress)
            if budget.stops_itself and tracker.evals_without_improvement >= config.speculator_patience:
                tracker.stop_reason = (
                    f"no gain in accepted length over {config.speculator_patience} evaluations"
                )
        if _checkpoint_due(config, progress, clock, time.monotonic()) and tracker.stop_reason is None:
            last, saved_at = _save_checkpoint(run, progress, output_dir, callbacks), progress.step
            clock.last_checkpoint = time.monotonic()
    if tracker.stop_reason is None:
        setting = "speculator_max_steps" if budget.stops_itself else "speculator_train_steps"
        tracker.stop_reason = f"reached {setting} ({budget.steps})"
    if run.best_state is not None and tracker.best_step not in (None, progress.step):
        run.trainable.load_trainable_state(run.best_state)
    callbacks.on_phase(
        progress.step,
        SPECULATOR_PHASE,
        f"the speculator phase ended after {tracker.steps} steps ({tracker.stop_reason}); "
        f"published the heads of step {tracker.best_step}, accepted length {tracker.best or 1.0:.2f}",
    )
    return False, last


def _budget(run: Run) -> Budget:
    next_token = isinstance(run.task, LanguageModelingTask)
    return Budget.of(run.config, next_token and bool(held_out_prompts(run.data.eval, 1)))


def _observe_acceptance(run: Run, progress: _Progress) -> None:
    """Measure the heads' held-out accepted length; keep them if they are the best so far."""
    counts = speculator_phase.total(speculator_phase.measure(run))
    if progress.speculator.observe(progress.step, counts.mean_accepted_length):
        run.best_state = run.trainable.trainable_state()


def _cancel(
    run: Run, progress: _Progress, callbacks: TrainingCallbacks, output_dir: Path, saved_at: int | None
) -> tuple[bool, Path | None]:
    """(whether the caller asked to stop, the checkpoint written for it): a stopped run is checkpointed
    where it is, without evaluating (a cancel must be honoured promptly, not after a pass over eval).
    Rank 0 asks; every rank stops at the same step."""
    if not run.world.agree(callbacks.should_stop()):
        return False, None
    if progress.step > 0 and saved_at != progress.step:
        return True, _save_checkpoint(run, progress, output_dir, callbacks)
    return True, None


def _checkpoint_due(config: TrainingConfig, progress: _Progress, clock: _Clock, now: float) -> bool:
    return progress.step % config.checkpoint_every_n_steps == 0 or (
        config.checkpoint_every_n_minutes is not None
        and now - clock.last_checkpoint >= 60 * config.checkpoint_every_n_minutes
    )


def _train_step(run: Run, progress: _Progress, callbacks: TrainingCallbacks, total_steps: int) -> None:
    """One optimiser step over effective_batch_size rows, accumulated over micro-batches; `total_steps`:
    what the progress report counts towards."""
    started = time.perf_counter()
    trainable, config = run.trainable, run.config
    if not run.features_built:
        # Inside the step, so its one-off cost counts in train_seconds (this step's tokens/s is low).
        build_features(run)
    # Every rank builds every micro-batch (host tensors, cheap): the counts below are the global batch's.
    batches = run.task.step_batches(
        run, run.micro_batches(run.examples_for_step(progress.step)), progress.step
    )
    # Normalise by the whole step's target count, so each token weighs the same whatever its micro-batch.
    n_targets = max(1, sum(batch.target_count for batch in batches))
    # turbo trains no weight of the model: it stays in eval mode (no LoRA dropout), as it will serve.
    trainable.model.train(trainable.trains_model)
    loss_total = 0.0
    for index in run.world.share(batches):  # this rank's micro-batches; all of them on one device
        with micro_batch_rng(run.device, config.seed, progress.step, index), trainable.autocast():
            loss = run.task.loss_sum(run, batches[index])
            run.scaler.scale(loss / n_targets).backward()
        loss_total += loss.item()
    params = [p for _, p in trainable.named_trainable()]
    run.world.sum_gradients(params)  # the global batch's gradient on every rank, before any clipping
    (loss_total,) = run.world.sum([loss_total])
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    learning_rate = run.scheduler.get_last_lr()[0]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    useful = sum(batch.useful_tokens for batch in batches)
    progress.step += 1
    progress.tokens_seen += sum(batch.token_count for batch in batches)
    progress.useful_tokens += useful
    progress.train_seconds += seconds
    progress.train_loss = loss_total / n_targets
    metrics: dict[str, float] = {
        "train_loss": progress.train_loss,
        "learning_rate": float(learning_rate),
        "epoch": progress.step / run.steps_per_epoch,
        "tokens_seen": float(progress.tokens_seen),
        "useful_tokens": float(progress.useful_tokens),
        "tokens_per_second": useful / seconds if seconds > 0 else 0.0,
        "grad_norm": float(grad_norm),
        **memory_metrics(run.device),
        **run.task.step_metrics(),
    }
    callbacks.on_step(progress.step, total_steps, metrics)


def _record_eval(run: Run, progress: _Progress, callbacks: TrainingCallbacks) -> None:
    """Evaluate at this step (once), track the best weights, and decide about early stopping."""
    if progress.eval_step == progress.step:
        return
    metrics = run.task.evaluate(run)
    progress.eval_step, progress.eval_metrics = progress.step, metrics
    progress.eval_loss = metrics["eval_loss"] if metrics else None
    if progress.eval_loss is None or metrics is None:
        return
    callbacks.on_eval(progress.step, metrics)
    config = run.config
    if progress.tracker.observe(progress.step, progress.eval_loss, metrics):
        # The best weights so far; kept only if they may be published instead of the last ones.
        run.best_state = run.trainable.trainable_state() if config.load_best_at_end else None
    elif config.enable_early_stopping and progress.tracker.out_of_patience(config.early_stopping_patience):
        progress.early_stopped = True


def _settle_model(run: Run, progress: _Progress, callbacks: TrainingCallbacks) -> None:
    """The model's steps are over: final evaluation, and its best weights restored if asked. These are
    the weights published (a speculator phase trains only the heads on top of them)."""
    _record_eval(run, progress, callbacks)
    tracker = progress.tracker
    progress.published_step = progress.step
    if (
        run.config.load_best_at_end
        and run.best_state is not None
        and tracker.best_step not in (None, progress.step)
    ):
        run.trainable.load_trainable_state(run.best_state)
        progress.published_step, progress.eval_loss = tracker.best_step or progress.step, tracker.best_loss
        progress.eval_metrics = tracker.best_metrics
    run.best_state = None  # a speculator phase keeps its own best (the heads alone)


def _finish(run: Run, progress: _Progress, budget: Budget) -> dict[str, Any]:
    """Quality report and the speculator's judgement of the published weights: the training summary."""
    published_step = progress.published_step
    quality = run.task.quality_report(run, progress.baseline, progress.eval_metrics)
    trainable = run.trainable
    return {
        "format": SUMMARY_FORMAT,
        "adapter_type": run.config.adapter,
        "config_used": run.config.model_dump(mode="json"),
        "autoconfig": {k: v for k, v in run.autoconfig.items() if k != "lora_kwargs"},
        "method": trainable.details,
        "runtime": {
            "device": run.device.type,
            "dtype": trainable.runtime.dtype_name,
            "devices": run.world.size,
        },
        "data": asdict(run.data.stats),
        "result": {
            "steps": progress.step,
            "total_steps": run.total_steps,
            "published_step": published_step,
            "early_stopped": progress.early_stopped,
            "train_loss": progress.train_loss,
            "eval_loss_before": progress.eval_loss_before,
            "eval_loss_after": progress.eval_loss,
            "tokens_seen": progress.tokens_seen,
            "useful_tokens": progress.useful_tokens,
            "train_seconds": round(progress.train_seconds, 3),
            "useful_tokens_per_second": progress.useful_tokens / max(progress.train_seconds, 1e-9),
        },
        "quality_report": quality,
        "speculator": _speculator_summary(run, progress, budget),
    }


def _speculator_summary(run: Run, progress: _Progress, budget: Budget) -> dict[str, Any] | None:
    """turbo types: per-head top-1 accuracy on the eval split, the accepted length serving would get on
    held-out prompts (replayed), and what the speculator phase did. None without a speculator or eval rows."""
    heads = objective.evaluate_heads(run.trainable, run.data.eval, run.pad_token_id)
    if heads is None:
        return None
    estimate = speculator_phase.estimate(run)
    heads["estimate"] = estimate
    heads["estimated_accepted_length"] = estimate["mean_accepted_length"] if estimate else None
    heads["phase"] = speculator_phase.summary(progress.speculator, budget)
    return heads


def _publish(run: Run, directory: Path, summary: dict[str, Any]) -> None:
    run.trainable.save(directory)
    write_summary(directory, summary)


def write_summary(directory: Path, summary: dict[str, Any]) -> None:
    """The artifact's training_summary.json; the worker rewrites it when it adds what it measured."""
    (directory / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")


# --- checkpoints -------------------------------------------------------------------------------


def _save_checkpoint(run: Run, progress: _Progress, output_dir: Path, callbacks: TrainingCallbacks) -> Path:
    """checkpoints/step-N/: loadable weights plus everything an exact resume needs; old ones pruned."""
    path = output_dir / "checkpoints" / f"step-{progress.step}"
    if not run.world.is_main:  # one writer; every rank holds the same (unsharded, global) state
        return path
    speculating = progress.phase == SPECULATOR_PHASE
    best_step = progress.speculator.best_step if speculating else progress.tracker.best_step
    best = run.best_state if best_step not in (None, progress.step) else None
    state = checkpoints.TrainerState(
        progress=asdict(progress),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        rng=checkpoints.capture_rng(run.device),
        best=best,
    )
    epoch, position = divmod(progress.step, run.steps_per_epoch)
    extra = {
        "data_position": {"epoch": epoch, "step_in_epoch": position},
        "total_steps": run.total_steps,
        "config": run.config.trajectory_fields(),
        "requested_config": run.requested_trajectory,
        "autoconfig": run.autoconfig,
    }
    checkpoints.save(path, run.trainable.save, state, extra)
    checkpoints.prune(output_dir / "checkpoints", run.config.keep_n_checkpoints)
    callbacks.on_checkpoint(progress.step, path)
    return path


def _check_same_trajectory(config: TrainingConfig, saved: dict[str, Any], path: Path) -> None:
    """A checkpoint continues only the run it came from: same rows, order, model and optimiser settings."""
    # Compared as requested, not as resolved: a resume on other hardware may resolve dtype differently.
    expected, recorded = config.trajectory_fields(), saved.get("requested_config") or {}
    changed = sorted(
        key for key in expected.keys() | recorded.keys() if expected.get(key) != recorded.get(key)
    )
    if changed:
        raise ValueError(f"cannot resume from {path}: the config differs in {', '.join(changed)}")


def _restore(run: Run, path: Path, state: checkpoints.TrainerState) -> _Progress:
    run.trainable.load_saved(path)
    raw = dict(state.progress)
    if "base_exact_match" in raw:  # a checkpoint from before tasks kept only the exact match
        exact_match = raw.pop("base_exact_match")
        raw["baseline"] = {"eval_loss": raw.get("eval_loss_before"), "exact_match": exact_match}
    tracker = EvalTracker(**raw.pop("tracker"))
    # A checkpoint written before the speculator phase existed has no tracker for it.
    heads = AcceptanceTracker(**raw.pop("speculator", {}))
    progress = _Progress(**raw, tracker=tracker, speculator=heads)
    run.task.restore(run, progress.baseline)
    if progress.phase == SPECULATOR_PHASE:  # its optimiser is the heads' own: made before loading into it
        speculator_phase.begin(run, _budget(run).steps)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if state.scaler is not None:
        run.scaler.load_state_dict(state.scaler)
    checkpoints.restore_rng(state.rng, run.device)
    best_step = heads.best_step if progress.phase == SPECULATOR_PHASE else tracker.best_step
    if best_step is not None and (run.config.load_best_at_end or progress.phase == SPECULATOR_PHASE):
        run.best_state = state.best if state.best is not None else run.trainable.trainable_state()
    return progress
