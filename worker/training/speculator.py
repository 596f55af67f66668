"""Owns the Medusa-style speculator: its heads, their config and files, and the losses they train on.

Head k (from 0) reads the base model's last hidden state at position t (after the final norm) and
proposes the token at t + k + 2; the LM head itself proposes t + 1. Each head is one residual block
`h + SiLU(W_k h)` feeding the base model's frozen LM head, so a head costs hidden² weights, not a
vocabulary projection of its own. W_k starts at zero: every head starts as the LM head itself.

Targets never cross a packed-example boundary: a head's target at t is taken only when t + k + 1 (the
position whose next token it is) lies in the same example as t.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tuneforge.rules.artifacts import SPECULATOR_WEIGHTS
from tuneforge.rules.speculator import DRAFT_VOCAB_KEY, SPECULATOR_FORMAT, SpeculatorConfig

from worker.training.data import IGNORE_INDEX


class ResidualBlock(torch.nn.Module):
    """h + SiLU(W h), W zero-initialised (identity at the start)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return hidden + torch.nn.functional.silu(self.linear(hidden))


# Drafting reads the LM head once per head; serving restricts it to the tokens the run's targets use
# most (FR-Spec's frequency-ranked draft vocabulary): 8192 of smollm2's 49152 rows cost a sixth of the
# full pass, and a draft outside them only means a rejected draft, never a different output.
DRAFT_VOCAB_SIZE = 8192


def frequent_tokens(label_rows: Sequence[Sequence[int]], limit: int = DRAFT_VOCAB_SIZE) -> torch.Tensor:
    """The `limit` most frequent target tokens (ties by id), as ascending ids."""
    counts: Counter[int] = Counter()
    for labels in label_rows:
        counts.update(token for token in labels if token != IGNORE_INDEX)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return torch.tensor(sorted(token for token, _ in ranked), dtype=torch.long)


class SpeculatorFiles(torch.nn.Module):
    """What both speculator kinds share: the config, the draft vocabulary, the files."""

    def __init__(self, config: SpeculatorConfig) -> None:
        super().__init__()
        self.config = config
        # Not a parameter or buffer: derived from this run's data (set_draft_vocab), saved for serving
        # beside the weights, never loaded back (a parent's data may differ).
        self.draft_vocab: torch.Tensor | None = None

    def set_draft_vocab(self, label_rows: Sequence[Sequence[int]]) -> None:
        vocab = frequent_tokens(label_rows)
        self.draft_vocab = vocab if len(vocab) else None

    def vocab_rows(self, lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(LM-head rows drafts choose among [Vd or V, D] fp32, detached; token id → row, -1 outside)."""
        weight = lm_head.weight
        assert isinstance(weight, torch.Tensor)
        if self.draft_vocab is None:
            return weight.detach().float(), None
        vocab = self.draft_vocab.to(weight.device)
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        lookup[vocab] = torch.arange(len(vocab), device=weight.device)
        return weight.detach().index_select(0, vocab).float(), lookup

    def save(self, directory: Path) -> None:
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        if self.draft_vocab is not None:
            state[DRAFT_VOCAB_KEY] = self.draft_vocab.to("cpu").contiguous()
        save_file(state, str(directory / SPECULATOR_WEIGHTS), metadata={"format": str(SPECULATOR_FORMAT)})
        self.config.save(directory)

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        """Load weights a same-shaped speculator saved (a checkpoint, or a parent version)."""
        saved = SpeculatorConfig.load(directory)
        if saved.architecture != self.config.architecture:
            raise ValueError(
                f"speculator_architecture: the saved speculator in {directory} is {saved.architecture!r}; "
                f"this run builds {self.config.architecture!r} (set speculator_architecture to match)"
            )
        if (saved.num_heads, saved.hidden_size) != (self.config.num_heads, self.config.hidden_size):
            raise ValueError(
                f"speculator_heads: the saved speculator in {directory} has {saved.num_heads} heads of "
                f"size {saved.hidden_size}; this run builds {self.config.num_heads} of size "
                f"{self.config.hidden_size}"
            )
        state = load_file(directory / SPECULATOR_WEIGHTS)
        state.pop(DRAFT_VOCAB_KEY, None)
        self.load_state_dict(state)


class MedusaHeads(SpeculatorFiles):
    """K residual blocks on the last hidden state; logits come from the base model's shared LM head."""

    def __init__(self, config: SpeculatorConfig) -> None:
        super().__init__(config)
        self.heads = torch.nn.ModuleList(ResidualBlock(config.hidden_size) for _ in range(config.num_heads))

    def head_logits(self, k: int, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """Head k's fp32 logits for hidden states [..., H] -> [..., V]."""
        block = self.heads[k]
        projected = block(hidden.float())  # heads keep fp32 weights whatever the base computes in
        weight = getattr(lm_head, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else projected.dtype
        return lm_head(projected.to(dtype)).float()


def segment_ids(
    batch_shape: torch.Size, cu_seq_lens: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """[B, S] example index of each position: from a packed row's boundaries; 0 for padded rows."""
    if cu_seq_lens is None:
        return torch.zeros(batch_shape, dtype=torch.long, device=device)
    positions = torch.arange(batch_shape[1], device=device)
    boundaries = cu_seq_lens.to(device=device, dtype=torch.long)[1:-1]
    return torch.bucketize(positions, boundaries, right=True).expand(batch_shape)  # [B, S]


def head_targets(targets: torch.Tensor, segments: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S] head k's target at each position: targets[t + k + 1] if in t's example, else ignored.

    `targets[t]` is the token at t + 1, so targets[t + k + 1] is the token at t + k + 2.
    """
    shift = k + 1
    out = torch.full_like(targets, IGNORE_INDEX)
    width = targets.shape[1] - shift
    if width <= 0:
        return out
    later = targets[:, shift:]
    same_example = segments[:, shift:] == segments[:, :width]
    out[:, :width] = torch.where(same_example, later, torch.full_like(later, IGNORE_INDEX))
    return out


@dataclass
class HeadStats:
    """Per-head summed losses and top-1 hits over a batch (or an eval split)."""

    loss_sums: list[torch.Tensor] = field(default_factory=list)  # 0-dim fp32, with grad in training
    correct: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def head_losses(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    segments: torch.Tensor,
) -> HeadStats:
    """Summed cross-entropy of each head over its valid targets; hidden [B, S, H], targets [B, S]."""
    stats = HeadStats()
    for k in range(heads.config.num_heads):
        wanted = head_targets(targets, segments, k)  # [B, S]
        valid = wanted != IGNORE_INDEX
        if not bool(valid.any()):
            stats.loss_sums.append(hidden.new_zeros((), dtype=torch.float32))
            stats.correct.append(0)
            stats.counts.append(0)
            continue
        logits = heads.head_logits(k, hidden[valid], lm_head)  # [N, V]
        labels = wanted[valid]  # [N]
        stats.loss_sums.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        stats.correct.append(int((logits.detach().argmax(-1) == labels).sum()))
        stats.counts.append(int(labels.numel()))
    return stats


def weighted_sum(stats: HeadStats, weights: Sequence[float]) -> torch.Tensor:
    return sum((w * loss for w, loss in zip(weights, stats.loss_sums, strict=True)), torch.zeros(()))


def summary(
    config: SpeculatorConfig, correct: list[int], agree: list[int], counts: list[int], loss: float | None
) -> dict[str, Any]:
    """The training summary's `speculator` section: per-head top-1 accuracy on the eval split. (Its
    accepted-length estimate is a replay of serving, worker/training/draft_replay.py: the product of
    per-head agreements, which assumes independent heads and ignores where answers end, overstated it.)"""
    accuracy = [c / n if n else 0.0 for c, n in zip(correct, counts, strict=True)]
    agreement = [c / n if n else 0.0 for c, n in zip(agree, counts, strict=True)]
    return {
        "num_heads": config.num_heads,
        "loss_weights": config.loss_weights,
        "distill": config.distill,
        "eval_positions": counts,
        "head_top1_accuracy": accuracy,  # against the dataset's tokens
        "head_top1_agreement": agreement,  # against the model's own greedy tokens (what verification accepts)
        "eval_head_loss": loss,
    }
