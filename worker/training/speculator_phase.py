"""Owns the speculator phase of a turbo run: after the model's steps, the heads alone train on the frozen,
published model until the accepted length serving would get on held-out prompts stops improving.

Why a phase of its own: the model's steps are sized for the model (turbo_lora's LoRA), while the
speedup keeps growing for hundreds of heads-only steps past them. With the model frozen, a step runs
only the speculator on cached features (feature_cache.py), so those steps are cheap. The heads learn
the model's own greedy tokens (self-distillation): that is what verification accepts.

The stopping rule measures, every `speculator_eval_every` steps, the mean accepted length of greedy
speculative decoding replayed on held-out prompts (draft_replay.py), keeps the best heads, and stops
after `speculator_patience` measurements without a gain of MIN_GAIN, or at `speculator_max_steps`.
An explicit `speculator_train_steps` trains exactly that many steps (still publishing the best heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tuneforge.config import DEFAULT_LEARNING_RATES

from worker.training import draft_replay, optim
from worker.training.config import TrainingConfig
from worker.training.draft_replay import HeldOutText, ReplayCounts
from worker.training.preparation import Run
from worker.training.quality import HELD_OUT_PROMPTS, held_out_prompts

# A gain smaller than this (tokens per verification step) is not an improvement: it stops the phase
# from running on for noise-level changes.
MIN_GAIN = 0.01
# Held-out prompts the stopping rule replays (a few dozen steps of each kind per evaluation); the first
# HELD_OUT_PROMPTS of them are the ones the serving engine then times (worker/artifact_checks/speedup.py).
RULE_PROMPTS = 32
# Tokens per request, as the engine's measurement decodes them (worker/artifact_checks/speedup.py).
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Budget:
    """How many phase steps may run, and whether the phase stops by itself before that."""

    steps: int
    stops_itself: bool
    reason: str  # why the budget is what it is, for a phase that does not run

    @classmethod
    def of(cls, config: TrainingConfig, has_prompts: bool) -> Budget:
        if config.speculator_train_steps is not None:
            return cls(config.speculator_train_steps, False, "speculator_train_steps is 0")
        if not has_prompts:
            reason = "no held-out row with a prompt to measure acceptance on (add an evaluation split)"
            return cls(0, True, reason)
        return cls(config.speculator_max_steps, True, "")


@dataclass
class AcceptanceTracker:
    """The best held-out accepted length so far and patience left; saved in checkpoints (JSON)."""

    steps: int = 0  # phase steps done
    seconds: float = 0.0  # their optimiser time (the feature cache's one-off build included)
    best: float | None = None
    best_step: int | None = None  # the run's global step of the best heads
    evals_without_improvement: int = 0
    history: list[list[float]] = field(default_factory=list)  # [global step, accepted length]
    stop_reason: str | None = None

    def observe(self, step: int, value: float) -> bool:
        """Record a measurement; True when it beats the best by MIN_GAIN (or is the first)."""
        self.history.append([step, round(value, 4)])
        if self.best is None or value >= self.best + MIN_GAIN:
            self.best, self.best_step, self.evals_without_improvement = value, step, 0
            return True
        self.evals_without_improvement += 1
        return False


def begin(run: Run, steps: int) -> None:
    """Freeze the model (its published weights), and give the heads an optimiser of their own for a
    phase of at most `steps` steps."""
    trainable = run.trainable
    heads = trainable.speculator
    assert heads is not None
    trainable.freeze_model()
    heads.config = heads.config.model_copy(update={"distill": True})
    config = run.config
    # turbo's learning rate is the heads'; turbo_lora's is its LoRA's, so its heads take turbo's default.
    rate = config.learning_rate if config.adapter == "turbo" else DEFAULT_LEARNING_RATES["turbo"]
    assert rate is not None
    run.optimizer = optim.build_optimizer(config.optimizer, trainable.named_trainable(), rate, run.device)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda _: 1.0)  # constant
    # The cache (turbo) held the run's features without distillation's greedy tokens; turbo_lora had none.
    run.features, run.features_built, run.phase_steps = None, False, steps


def texts(run: Run) -> list[HeldOutText]:
    """The held-out prompts and the frozen model's continuations, computed once per process."""
    if run.replay_texts is None:
        prompts = held_out_prompts(run.data.eval, RULE_PROMPTS)
        run.replay_texts = draft_replay.prepare(run.trainable, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return run.replay_texts


def measure(run: Run) -> list[ReplayCounts]:
    return draft_replay.measure(run.trainable, texts(run), max_new_tokens=MAX_NEW_TOKENS)


def total(counts: list[ReplayCounts]) -> ReplayCounts:
    return sum(counts, ReplayCounts())


def estimate(run: Run) -> dict[str, Any] | None:
    """The training summary's estimate: the replayed counts on the prompts the engine then times."""
    if run.trainable.speculator is None or not held_out_prompts(run.data.eval, 1):
        return None
    # The prompts the engine times are the first of the rule's: only those are replayed.
    measured = texts(run)[:HELD_OUT_PROMPTS]
    counts = total(draft_replay.measure(run.trainable, measured, max_new_tokens=MAX_NEW_TOKENS))
    return {
        "mean_accepted_length": round(counts.mean_accepted_length, 3),
        "acceptance_rate": round(counts.acceptance_rate, 3),
        "prompts": len(measured),
        "max_new_tokens": MAX_NEW_TOKENS,
        "depth": run.trainable.speculator.config.num_heads,
        "method": "greedy speculative decoding replayed as the serving engine verifies",
    }


def summary(tracker: AcceptanceTracker, budget: Budget) -> dict[str, Any]:
    """The speculator section's `phase` entry."""
    return {
        "steps": tracker.steps,
        "seconds": round(tracker.seconds, 3),
        "budget": budget.steps,
        "stops_itself": budget.stops_itself,
        "stop_reason": tracker.stop_reason or budget.reason,
        "best_step": tracker.best_step,
        "best_accepted_length": tracker.best,
        "history": tracker.history,
    }
