"""Owns task `dpo`: direct preference optimisation (sigmoid loss, with cDPO's label smoothing) of a LoRA
against a reference that is the model as the run starts.

The reference costs no second copy of the weights. Its log-probs of every pair are computed once, before
the first step (as TRL's precompute_ref_log_probs does): with the adapter switched off for a fresh
adapter, or with the adapter as it starts when the run continues a parent version (the SFT adapter of an
SFT -> DPO recipe). They are kept in the run's baseline, which every checkpoint holds, so a resumed run
gets back exactly the reference it started with, even though the parent's weights are gone by then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tuneforge.config import DEFAULT_BETA

from worker.training.attention import reads_boundaries_on_device
from worker.training.batches import Batch, make_batch
from worker.training.config import TrainingConfig
from worker.training.data import IGNORE_INDEX, PreparedData
from worker.training.methods import TrainableModel
from worker.training.preference_data import PreferencePair, prepare_preferences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from worker.training.preparation import Inputs, Run

REFERENCE_KEY = "reference_logps"  # the baseline's entry holding the reference log-probs
EVAL_METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logp_accuracy")


@dataclass(frozen=True)
class PairBatch:
    """n preference pairs as 2n sequences (the chosen replies, then the rejected ones), packed or padded."""

    sequences: Batch
    owner: torch.Tensor  # [B, S]: the sequence (0..2n-1) whose reply token position s predicts, else -1
    reference: torch.Tensor  # [2, n] fp32: the reference's summed log-probs of chosen, rejected
    pairs: int

    @property
    def target_count(self) -> int:
        return self.pairs  # the step's loss is the mean over its pairs

    @property
    def useful_tokens(self) -> int:
        return self.sequences.useful_tokens

    @property
    def token_count(self) -> int:
        return self.sequences.token_count

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.sequences.to(device),
            self.owner.to(device, non_blocking=True),
            self.reference.to(device, non_blocking=True),
            self.pairs,
        )


def pair_batch(
    pairs: Sequence[PreferencePair], reference: torch.Tensor, pad_token_id: int, *, packed: bool
) -> PairBatch:
    """The model inputs of `pairs`; `reference` [2, n]: their reference log-probs (zeros while computing
    them). Packed, every sequence is its own segment: positions restart and attention stays inside it."""
    examples = [p.sequences()[0] for p in pairs] + [p.sequences()[1] for p in pairs]
    batch = make_batch(examples, pad_token_id, packed=packed)
    count = torch.arange(len(examples))
    if packed:
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        ids = torch.repeat_interleave(count, lengths)[None, :]  # [1, T]
    else:
        ids = count[:, None].expand_as(batch.targets)  # [B, S]
    owner = torch.where(batch.targets != IGNORE_INDEX, ids, -1)
    return PairBatch(batch, owner, reference, len(pairs))


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """[2, n] fp32: each sequence's summed log-prob of its reply tokens (chosen row 0, rejected row 1).

    Only positions that predict a reply token reach the LM head (`logits_to_keep`), as in SFT's loss.
    """
    sequences = batch.sequences
    keep = (sequences.targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # [K]
    inputs = sequences.model_inputs(boundaries_on_device=reads_boundaries_on_device(model))
    logits = model(**inputs, logits_to_keep=keep).logits  # [B, K, V]
    targets = sequences.targets[:, keep].flatten()  # [B*K]
    owner = batch.owner[:, keep].flatten()  # [B*K]
    # cross_entropy is 0 at ignored positions; those add nothing to sequence 0 below.
    token_logps = -F.cross_entropy(
        logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    sums = torch.zeros(2 * batch.pairs, device=token_logps.device, dtype=torch.float32)
    return sums.index_add(0, owner.clamp(min=0), token_logps).view(2, batch.pairs)


@dataclass(frozen=True)
class PairLosses:
    losses: torch.Tensor  # [n]: each pair's DPO loss (with autograd)
    rewards: torch.Tensor  # [2, n]: implicit rewards beta * (log pi - log ref) of chosen, rejected (detached)


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float
) -> PairLosses:
    """Sigmoid DPO (Rafailov et al.) with cDPO's label smoothing, on [2, n] summed log-probs:
    loss = -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h),
    h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))."""
    ratios = policy - reference  # [2, n]
    h = ratios[0] - ratios[1]  # [n]
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PairLosses(losses, beta * ratios.detach())


@dataclass
class _Sums:
    """Running sums over pairs, for a step's or an evaluation's means."""

    pairs: int = 0
    values: dict[str, float] = field(default_factory=dict)

    def add(self, result: PairLosses, policy: torch.Tensor) -> None:
        rewards = result.rewards.float()
        margin = rewards[0] - rewards[1]
        adds = {
            "loss": result.losses.detach().sum(),
            "rewards_chosen": rewards[0].sum(),
            "rewards_rejected": rewards[1].sum(),
            "reward_margin": margin.sum(),
            "reward_accuracy": (margin > 0).float().sum(),
            "logp_accuracy": (policy[0] > policy[1]).float().sum(),
        }
        for name, value in adds.items():
            self.values[name] = self.values.get(name, 0.0) + float(value)
        self.pairs += result.losses.numel()

    def mean(self, name: str) -> float:
        return self.values.get(name, 0.0) / max(1, self.pairs)


class PreferenceTask:
    """Task `dpo`: see the module docstring."""

    def __init__(self, config: TrainingConfig, inputs: Inputs) -> None:
        self.beta = config.beta if config.beta is not None else DEFAULT_BETA["dpo"]
        self.label_smoothing = config.label_smoothing
        self.continues_parent = inputs.init_from is not None
        self._reference: dict[int, tuple[float, float]] | None = None  # row -> (chosen, rejected)
        self._step = _Sums()

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> PreparedData:
        return prepare_preferences(rows, tokenizer, config)

    def step_batches(self, run: Run, micro_batches: Sequence[Sequence[Any]], step: int) -> list[PairBatch]:
        return [self._batch(run, micro, packed=run.config.packing) for micro in micro_batches]

    def loss_sum(self, run: Run, batch: PairBatch) -> torch.Tensor:
        batch = batch.to(run.device)
        policy = sequence_logps(run.trainable.model, batch)
        result = dpo_losses(policy, batch.reference, self.beta, self.label_smoothing)
        self._step.add(result, policy.detach())
        return result.losses.sum()

    def step_metrics(self) -> dict[str, float]:
        step, self._step = self._step, _Sums()
        names = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
        return {name: step.mean(name) for name in names} if step.pairs else {}

    def evaluate(self, run: Run) -> dict[str, float] | None:
        pairs: list[PreferencePair] = run.data.eval  # type: ignore[assignment]  # this task's examples
        if not pairs:
            return None
        sums = _Sums()
        size = run.config.eval_micro_batch_size
        with _inference(run.trainable):
            for start in range(0, len(pairs), size):
                batch = self._batch(run, pairs[start : start + size], packed=run.config.packing)
                batch = batch.to(run.device)
                policy = sequence_logps(run.trainable.model, batch)
                sums.add(dpo_losses(policy, batch.reference, self.beta, self.label_smoothing), policy)
        return {"eval_loss": sums.mean("loss")} | {f"eval_{name}": sums.mean(name) for name in EVAL_METRICS}

    def baseline(self, run: Run) -> dict[str, Any] | None:
        """The reference log-probs (computed here, before the first step), then the held-out metrics."""
        self._reference = self._compute_reference(run)
        metrics: dict[str, Any] = dict(self.evaluate(run) or {})
        rows = sorted(self._reference)
        metrics[REFERENCE_KEY] = {
            "rows": rows,
            "chosen": [self._reference[row][0] for row in rows],
            "rejected": [self._reference[row][1] for row in rows],
        }
        return metrics

    def restore(self, run: Run, baseline: dict[str, Any] | None) -> None:
        """A resumed run: the reference log-probs its checkpoint kept (JSON floats round-trip exactly)."""
        saved = (baseline or {}).get(REFERENCE_KEY)
        if saved is None:
            raise ValueError("cannot resume this dpo run: its checkpoint holds no reference log-probs")
        reference = dict(
            zip(saved["rows"], zip(saved["chosen"], saved["rejected"], strict=True), strict=True)
        )
        missing = [p.row for p in [*run.data.train, *run.data.eval] if p.row not in reference]  # type: ignore[attr-defined]
        if missing:
            raise ValueError(
                f"cannot resume this dpo run: its checkpoint has no reference for rows {missing[:5]}"
            )
        self._reference = {int(row): (float(c), float(r)) for row, (c, r) in reference.items()}

    def quality_report(
        self, run: Run, baseline: dict[str, Any] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        before, after = baseline or {}, after or {}
        n = len(run.data.eval)

        def compare(name: str) -> dict[str, float | None]:
            return {"before": before.get(name), "after": after.get(name)}

        return {
            "task": "dpo",
            "summary": _summary(n, before, after),
            "eval_pairs": n,
            "reward_accuracy": compare("eval_reward_accuracy"),
            "reward_margin": compare("eval_reward_margin"),
            "logp_accuracy": compare("eval_logp_accuracy"),
            "eval_loss": compare("eval_loss"),
        }

    def _batch(self, run: Run, pairs: Sequence[PreferencePair], *, packed: bool) -> PairBatch:
        if self._reference is None:
            raise RuntimeError("the dpo reference is computed by baseline() or restored before any step")
        values = [self._reference[pair.row] for pair in pairs]
        reference = torch.tensor(values, dtype=torch.float32).T.contiguous()  # [2, n]
        return pair_batch(pairs, reference, run.pad_token_id, packed=packed)

    @torch.no_grad()
    def _compute_reference(self, run: Run) -> dict[int, tuple[float, float]]:
        """Every pair's reference log-probs, in fixed chunks of the data order (never the step's batches),
        so the values do not depend on which step first needs them."""
        pairs: list[PreferencePair] = [*run.data.train, *run.data.eval]  # type: ignore[list-item]
        size, packed, model = run.config.eval_micro_batch_size, run.config.packing, run.trainable.model
        reference: dict[int, tuple[float, float]] = {}
        with _inference(run.trainable), _reference_model(run.trainable, self.continues_parent):
            for start in range(0, len(pairs), size):
                chunk = pairs[start : start + size]
                zeros = torch.zeros((2, len(chunk)), dtype=torch.float32)
                batch = pair_batch(chunk, zeros, run.pad_token_id, packed=packed).to(run.device)
                for pair, chosen, rejected in zip(chunk, *sequence_logps(model, batch).tolist(), strict=True):
                    reference[pair.row] = (chosen, rejected)
        return reference


@contextlib.contextmanager
def _reference_model(trainable: TrainableModel, continues_parent: bool) -> Iterator[None]:
    """The model as the run starts: a parent's adapter as it is (it has not trained yet), or the base with
    a fresh adapter switched off (the same function for LoRA's zero-initialised B, not for DoRA's)."""
    if continues_parent:
        yield
        return
    with trainable.as_base_model() as base:
        if not base:
            raise ValueError("task dpo needs an adapter it can switch off for its reference")
        yield


@contextlib.contextmanager
def _inference(trainable: TrainableModel) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's mode is restored after it."""
    was_training = trainable.model.training
    trainable.model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        trainable.model.train(was_training)


def _summary(pairs: int, before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    if not pairs or "eval_reward_accuracy" not in after:
        return (
            "No held-out preference pairs, so the adapter was not judged; set eval_fraction or give rows "
            "split 'evaluation'."
        )
    likelihood = ""
    if before.get("eval_logp_accuracy") is not None:
        likelihood = (
            f"; it gives the chosen reply the higher likelihood in {after['eval_logp_accuracy']:.0%} of "
            f"them, against {before['eval_logp_accuracy']:.0%} for the model it started from"
        )
    return (
        f"On {pairs} held-out pairs the adapter's implicit reward ranks the chosen reply above the rejected "
        f"one in {after['eval_reward_accuracy']:.0%} (mean margin {after['eval_reward_margin']:.3f})"
        f"{likelihood}."
    )
