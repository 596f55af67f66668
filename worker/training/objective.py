"""Owns what a run minimises: next-token loss, plus the speculator heads' weighted losses for turbo types.

turbo_lora: LM loss + sum_k w_k * head_k loss, one forward of base + LoRA for both. turbo: the heads'
losses only; the base (and a parent LoRA) is frozen, so its forward runs without autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.training import eagle, speculator
from worker.training.attention import reads_boundaries_on_device
from worker.training.batches import Batch, make_batch, token_loss_sum
from worker.training.data import IGNORE_INDEX, Example
from worker.training.feature_cache import Features
from worker.training.methods import TrainableModel
from worker.training.speculator import HeadStats


def loss_sum(trainable: TrainableModel, batch: Batch, features: Features | None = None) -> torch.Tensor:
    """The run's summed loss over the batch (0-dim fp32), normalised by the caller's target count.

    features: the frozen model's outputs for this batch (turbo, worker/training/feature_cache.py);
    when given, the model does not run.
    """
    if trainable.speculator is None:
        return token_loss_sum(trainable.model, batch)
    loss, _, _ = _turbo_forward(trainable, batch, features)
    return loss


def _turbo_forward(
    trainable: TrainableModel, batch: Batch, features: Features | None = None
) -> tuple[torch.Tensor, HeadStats, torch.Tensor]:
    """(summed objective, per-head stats on the heads' targets, the model's greedy tokens [B, S])."""
    heads = trainable.speculator
    assert heads is not None
    if features is not None:
        assert not trainable.trains_model, "cached features serve only a frozen model"
        hidden, lm_logits = features.hidden, torch.zeros((0,), device=features.hidden.device)
        greedy = (
            features.greedy if features.greedy is not None else torch.full_like(batch.targets, IGNORE_INDEX)
        )
    else:
        # The LM's logits are needed for its own loss, or for the greedy tokens heads distill.
        lm = trainable.trains_model or heads.config.distill
        hidden, lm_logits, greedy = _forward(trainable, batch, lm=lm)
    has_target = batch.targets != IGNORE_INDEX  # [B, S]
    lm_loss = (
        torch.nn.functional.cross_entropy(lm_logits, batch.targets[has_target], reduction="sum")
        if trainable.trains_model
        else lm_logits.new_zeros(())
    )
    segments = speculator.segment_ids(batch.targets.shape, batch.cu_seq_lens, batch.targets.device)
    # Self-distillation: the model's own greedy token stands where the dataset's would.
    head_targets = greedy if heads.config.distill else batch.targets
    stats = _head_losses(trainable, batch, hidden, head_targets, segments)
    heads_loss = speculator.weighted_sum(stats, heads.config.loss_weights).to(lm_loss.device)
    return lm_loss + heads_loss, stats, greedy


def _forward(
    trainable: TrainableModel, batch: Batch, *, lm: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last hidden states [B, S, H], LM logits at target positions [N, V] fp32, greedy tokens [B, S]).

    One decoder pass serves the LM loss, the greedy tokens and every head. Without trainable model
    weights (turbo) it runs without autograd: only the heads need gradients. `lm=False` skips the
    vocabulary projection (logits [0, V], greedy all ignored) when neither is needed.
    """
    causal_lm = trainable.causal_lm()
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable.trains_model):
        inputs = batch.model_inputs(boundaries_on_device=reads_boundaries_on_device(causal_lm))
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state  # [B, S, H]
    has_target = batch.targets != IGNORE_INDEX  # [B, S]
    if not lm:
        has_target = torch.zeros_like(has_target)
    lm_logits = _lm_head(trainable)(hidden[has_target]).float()  # [N, V]
    greedy = torch.full_like(batch.targets, IGNORE_INDEX)  # [B, S]
    greedy[has_target] = lm_logits.detach().argmax(-1)
    return hidden, lm_logits, greedy


def _head_losses(
    trainable: TrainableModel,
    batch: Batch,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
) -> HeadStats:
    """Per-depth losses and hits of the run's speculator, whichever kind it is."""
    heads = trainable.speculator
    if isinstance(heads, eagle.EagleDraft):
        causal_lm = trainable.causal_lm()
        embed = causal_lm.get_input_embeddings()
        assert isinstance(embed, torch.nn.Module)
        return eagle.draft_losses(
            heads, hidden, _lm_head(trainable), targets, segments,
            input_ids=batch.input_ids, embed=embed, rotary=causal_lm.get_decoder().rotary_emb,
            position_ids=batch.position_ids,
        )  # fmt: skip
    assert isinstance(heads, speculator.MedusaHeads)
    return speculator.head_losses(heads, hidden, _lm_head(trainable), targets, segments)


def _lm_head(trainable: TrainableModel) -> torch.nn.Module:
    lm_head = trainable.causal_lm().get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Module)
    return lm_head


@torch.no_grad()
def evaluate_heads(
    trainable: TrainableModel, examples: Sequence[Example], pad_token_id: int
) -> dict[str, Any] | None:
    """Per-head top-1 accuracy on the eval split: against the dataset's tokens, and agreement with the
    model's own greedy tokens (what verification accepts).
    """
    heads = trainable.speculator
    if heads is None or not examples:
        return None
    model, config = trainable.model, trainable.config
    was_training = model.training
    model.eval()
    n, size = heads.config.num_heads, config.eval_micro_batch_size
    correct, agree, counts, loss_total, targets = [0] * n, [0] * n, [0] * n, 0.0, 0
    try:
        for start in range(0, len(examples), size):
            micro = examples[start : start + size]
            batch = make_batch(micro, pad_token_id, packed=config.packing).to(trainable.runtime.device)
            hidden, _, greedy = _forward(trainable, batch)
            segments = speculator.segment_ids(batch.targets.shape, batch.cu_seq_lens, batch.targets.device)
            dataset = _head_losses(trainable, batch, hidden, batch.targets, segments)
            own = _head_losses(trainable, batch, hidden, greedy, segments)
            for k in range(n):
                correct[k] += dataset.correct[k]
                agree[k] += own.correct[k]
                counts[k] += dataset.counts[k]
            trained_on = own if heads.config.distill else dataset
            loss_total += float(speculator.weighted_sum(trained_on, heads.config.loss_weights))
            targets += batch.target_count
    finally:
        model.train(was_training)
    loss = loss_total / targets if targets else None
    return speculator.summary(heads.config, correct, agree, counts, loss)
