"""Task `grpo`: reinforcement fine-tuning with reward functions (Group Relative Policy Optimisation).

Each step takes `batch_size` prompts, samples `num_generations` completions of each with the current
policy (through a `RolloutSampler`: the serving engine, with the adapter being trained pushed into it),
scores them with every reward function in the sandbox (their sum is the reward), normalises the rewards
within each prompt's group into advantages, and minimises the clipped policy-gradient loss plus
`beta` * KL to the reference (the base with the adapter switched off): grpo_loss.py. One optimiser step
per batch of rollouts; the step's loss is averaged per completion (target_count = completions).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft import PeftModel, get_peft_model_state_dict

from worker.training.config import TrainingConfig
from worker.training.data import PreparedData
from worker.training.grpo_data import PromptExample, prepare_prompts
from worker.training.grpo_loss import group_advantages, policy_loss, token_logprobs
from worker.training.grpo_rollouts import AdapterSnapshot, Completion, RolloutParams, RolloutSampler
from worker.training.reward_sandbox import RewardSandbox, SandboxLimits
from worker.training.runtime import TrainingConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from worker.training.methods import TrainableModel
    from worker.training.preparation import Inputs, Run

# Rollout seeds: a pure function of (config.seed, step), so a resumed run samples what it would have.
_SEED_STRIDE = 1_000_003
EVAL_SEED = 0  # greedy: the seed changes nothing, but the engine wants one


class RewardScores(Protocol):
    values: dict[str, list[float]]  # function name -> a score per completion
    failures: dict[str, int]  # function name -> calls that raised, timed out or returned no number


class RewardScorer(Protocol):
    """The reward sandbox (worker/training/reward_sandbox.py)."""

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> RewardScores: ...

    def close(self) -> None: ...


@dataclass
class RolloutBatch:
    """One micro-batch of completions, right-padded: `[N, L]` prompt + completion tokens."""

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long
    completion_mask: torch.Tensor  # [N, L] float: 1 on completion tokens
    old_logps: torch.Tensor  # [N, L] float: a completion token's sampling-time logprob, 0 elsewhere
    advantages: torch.Tensor  # [N]
    useful_tokens: int

    @property
    def target_count(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def token_count(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> RolloutBatch:
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        return RolloutBatch(*moved, useful_tokens=self.useful_tokens)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.completion_mask, self.old_logps, self.advantages)


@dataclass
class _StepStats:
    """What loss_sum accumulates over a step's micro-batches (per completion)."""

    kl: float = 0.0
    clipped: float = 0.0
    completions: int = 0
    rewards: dict[str, float] = field(default_factory=dict)


def rollout_seed(seed: int, step: int) -> int:
    return (seed * _SEED_STRIDE + step) % (2**63 - 1)


def adapter_snapshot(trainable: TrainableModel) -> AdapterSnapshot:
    """The trainable LoRA's current config and weights, on the host."""
    model = trainable.model
    if not isinstance(model, PeftModel):
        raise TrainingConfigError("task 'grpo' trains a LoRA (adapter 'lora'); this model holds none")
    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    return AdapterSnapshot(config, state)


class GRPOTask:
    """Task `grpo` (see the module docstring)."""

    def __init__(
        self, config: TrainingConfig, sampler: RolloutSampler, make_scorer: Callable[[], RewardScorer]
    ) -> None:
        assert config.reward_fns is not None  # the config refuses grpo without reward functions
        self.config = config
        self.sampler = sampler
        self.names = list(config.reward_fns.functions)
        self._make_scorer = make_scorer
        self._scorer: RewardScorer | None = None
        self._stats = _StepStats()
        self._pending: dict[str, float] = {}

    @property
    def params(self) -> RolloutParams:
        sp = self.config.sampling_params
        return RolloutParams(sp.temperature, sp.top_p, sp.top_k, sp.max_tokens)

    def scorer(self) -> RewardScorer:
        if self._scorer is None:
            scorer = self._scorer = self._make_scorer()
            # The sandbox's processes end with the task, however the run ends.
            weakref.finalize(self, scorer.close)
        return self._scorer

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    # --- TrainingTask ---------------------------------------------------------------------------------

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> PreparedData:
        return prepare_prompts(rows, tokenizer, config)

    def step_batches(
        self, run: Run, micro_batches: Sequence[Sequence[PromptExample]], step: int
    ) -> list[RolloutBatch]:
        prompts = [example for micro in micro_batches for example in micro]
        n = self.config.num_generations
        snapshot = adapter_snapshot(run.trainable)
        groups = self.sampler.sample(
            [p.prompt_ids for p in prompts], n, self.params, rollout_seed(self.config.seed, step), snapshot
        )
        rewards, per_function, failures = self._rewards(run, prompts, groups)  # [P, G]
        advantages = group_advantages(rewards)
        completions = [c for group in groups for c in group]
        self._pending = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.flatten().std()) if rewards.numel() > 1 else 0.0,
            **{f"reward/{name}": value for name, value in per_function.items()},
            **{f"reward_failures/{name}": float(count) for name, count in failures.items()},
            "completion_length": sum(len(c.token_ids) for c in completions) / max(1, len(completions)),
        }
        self._stats = _StepStats()
        batches, start = [], 0
        for micro in micro_batches:
            end = start + len(micro)
            batches.append(
                _batch(micro, groups[start:end], advantages[start:end].flatten(), run.pad_token_id)
            )
            start = end
        return batches

    def loss_sum(self, run: Run, batch: RolloutBatch) -> torch.Tensor:  # type: ignore[override]
        batch = batch.to(run.device)
        model = run.trainable.model
        tokens = batch.input_ids[:, 1:]  # [N, L-1]: position t's logits predict token t + 1
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logps = token_logprobs(logits[:, :-1], tokens)
        del logits
        with torch.no_grad(), run.trainable.as_base_model():
            ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            ref_logps = token_logprobs(ref_logits[:, :-1], tokens)
        terms = policy_loss(
            logps,
            batch.old_logps[:, 1:],
            ref_logps,
            batch.advantages,
            batch.completion_mask[:, 1:],
            clip_epsilon=self.config.clip_epsilon,
            beta=float(self.config.beta or 0.0),
        )
        self._stats.kl += float(terms.kl.sum())
        self._stats.clipped += float(terms.clipped.sum())
        self._stats.completions += batch.target_count
        return terms.loss.sum()

    def step_metrics(self) -> dict[str, float]:
        stats, metrics = self._stats, self._pending
        count = max(1, stats.completions)
        metrics = {**metrics, "kl": stats.kl / count, "clip_ratio": stats.clipped / count} if metrics else {}
        self._stats, self._pending = _StepStats(), {}
        return metrics

    def evaluate(self, run: Run) -> dict[str, float] | None:
        return self._greedy_rewards(run, adapter_snapshot(run.trainable))

    def restore(self, run: Run, baseline: dict[str, Any] | None) -> None:
        pass  # its baseline is only compared against, by the quality report

    def baseline(self, run: Run) -> dict[str, Any] | None:
        return self.evaluate(run)

    def quality_report(
        self, run: Run, baseline: dict[str, Any] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        before, now = baseline or {}, after or {}
        b, a = before.get("eval_reward_mean"), now.get("eval_reward_mean")
        if b is None or a is None:
            summary = "No held-out prompts, so the mean reward was not measured before and after training."
        else:
            summary = (
                f"Greedy completions of {len(run.data.eval)} held-out prompts: mean reward {b:.4g} before "
                f"training, {a:.4g} after."
            )
        return {
            "task": "grpo",
            "summary": summary,
            "reward_mean": {"before": b, "after": a},
            **{
                f"reward/{name}": {
                    "before": before.get(f"eval_reward/{name}"),
                    "after": now.get(f"eval_reward/{name}"),
                }
                for name in self.names
            },
        }

    # --- rewards --------------------------------------------------------------------------------------

    def _rewards(
        self, run: Run, prompts: Sequence[PromptExample], groups: Sequence[Sequence[Completion]]
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, int]]:
        """Total rewards `[P, G]`, each function's mean, and its failures (a failed call scores 0)."""
        tokenizer = run.trainable.tokenizer
        flat = [(p, c) for p, group in zip(prompts, groups, strict=True) for c in group]
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for _, c in flat]
        scores = self.scorer().score([p.prompt for p, _ in flat], texts, [p.example for p, _ in flat])
        columns = {
            name: [_finite(v) for v in scores.values.get(name, [0.0] * len(flat))] for name in self.names
        }
        total = torch.tensor([sum(col[i] for col in columns.values()) for i in range(len(flat))])
        means = {name: sum(col) / max(1, len(col)) for name, col in columns.items()}
        failures = {name: int(scores.failures.get(name, 0)) for name in self.names}
        return total.view(len(prompts), -1), means, failures

    def _greedy_rewards(self, run: Run, adapter: AdapterSnapshot | None) -> dict[str, float] | None:
        prompts: list[PromptExample] = list(run.data.eval)
        if not prompts:
            return None
        greedy = RolloutParams(0.0, 1.0, None, self.config.sampling_params.max_tokens)
        groups = self.sampler.sample([p.prompt_ids for p in prompts], 1, greedy, EVAL_SEED, adapter)
        rewards, per_function, _ = self._rewards(run, prompts, groups)
        mean = float(rewards.mean())
        return {
            "eval_loss": -mean,
            "eval_reward_mean": mean,
            **{f"eval_reward/{name}": value for name, value in per_function.items()},
        }


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _batch(
    prompts: Sequence[PromptExample],
    groups: Sequence[Sequence[Completion]],
    advantages: torch.Tensor,
    pad_token_id: int,
) -> RolloutBatch:
    rows = [(p.prompt_ids, c) for p, group in zip(prompts, groups, strict=True) for c in group]
    width = max(len(ids) + len(c.token_ids) for ids, c in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width))
    old = torch.zeros((n, width))
    for i, (ids, c) in enumerate(rows):
        p, length = len(ids), len(ids) + len(c.token_ids)
        input_ids[i, :length] = torch.tensor(ids + c.token_ids)
        attention[i, :length] = 1
        completion[i, p:length] = 1
        old[i, p:length] = torch.tensor(c.logprobs)
    useful = int(attention.sum())
    return RolloutBatch(input_ids, attention, completion, old, advantages.float(), useful_tokens=useful)


def grpo_task(config: TrainingConfig, inputs: Inputs) -> GRPOTask:
    """The factory TASK_FACTORIES runs: the rollout sampler comes with the inputs, the rewards from the
    config's functions, run in the sandbox."""
    if inputs.rollouts is None:
        raise TrainingConfigError(
            "task 'grpo' samples rollouts with the serving engine, and this run was given no rollout sampler"
        )
    reward_fns = config.reward_fns
    assert reward_fns is not None

    def make_scorer() -> RewardScorer:  # the sandbox's processes start on the first step's scoring
        functions = {name: fn.source for name, fn in reward_fns.functions.items()}
        packages = tuple(reward_fns.runtime.packages or ()) if reward_fns.runtime else ()
        try:
            return RewardSandbox(functions, inputs.reward_limits or SandboxLimits(), packages=packages)
        except ValueError as exc:  # a package the workers lack, a function that does not load
            raise TrainingConfigError(f"reward_fns: {exc}") from None

    return GRPOTask(config, inputs.rollouts, make_scorer)
