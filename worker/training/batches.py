"""Owns turning a micro-batch of examples into model inputs: packed (no padding) or right-padded.

Both layouts carry `targets`: for each position, the token it must predict (IGNORE_INDEX where
no loss is taken). Targets are shifted within each example, so in a packed row the last token of
one example never learns to predict the first token of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.training.attention import reads_boundaries_on_device
from worker.training.data import IGNORE_INDEX, Example


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S]: the next token each position predicts, or IGNORE_INDEX
    attention_mask: torch.Tensor | None  # [B, S]; None for a packed row
    position_ids: torch.Tensor | None  # [1, T]: restarts at 0 for every packed example
    cu_seq_lens: torch.Tensor | None  # [n + 1]: packed example boundaries (what varlen attention reads)
    max_length: int  # longest example
    useful_tokens: int  # real (non-padding) tokens
    target_count: int

    @property
    def token_count(self) -> int:
        """Every position through the model, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            move(self.attention_mask),
            move(self.position_ids),
            self.cu_seq_lens,  # read on the host by the attention function
            self.max_length,
            self.useful_tokens,
            self.target_count,
        )

    def model_inputs(self, *, boundaries_on_device: bool = False) -> dict[str, object]:
        """Keyword arguments for a causal LM's forward; `boundaries_on_device`: for flash-attention."""
        if self.cu_seq_lens is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        boundaries = self.cu_seq_lens
        if boundaries_on_device:
            boundaries = boundaries.to(self.input_ids.device, non_blocking=True)
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


def shifted_targets(example: Example) -> list[int]:
    """Position t's target is the label of t + 1; the example's last position predicts nothing."""
    return [*example.labels[1:], IGNORE_INDEX]


def pack(examples: Sequence[Example]) -> Batch:
    """One row holding every example back to back, with per-example positions and boundaries."""
    ids = [token for e in examples for token in e.input_ids]
    targets = [token for e in examples for token in shifted_targets(e)]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    lengths = [len(e.input_ids) for e in examples]
    boundaries = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    target_tensor = torch.tensor([targets], dtype=torch.long)  # [1, T]
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),  # [1, T]
        targets=target_tensor,
        attention_mask=None,
        position_ids=torch.tensor([positions], dtype=torch.long),  # [1, T]
        cu_seq_lens=boundaries,
        max_length=max(lengths),
        useful_tokens=len(ids),
        target_count=int((target_tensor != IGNORE_INDEX).sum()),
    )


def pad(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked out of attention and of the loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # [B, S]
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, S]
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, :n] = torch.tensor(shifted_targets(example))
        attention_mask[row, :n] = 1
    return Batch(
        input_ids=input_ids,
        targets=targets,
        attention_mask=attention_mask,
        position_ids=None,
        cu_seq_lens=None,
        max_length=width,
        useful_tokens=int(attention_mask.sum()),
        target_count=int((targets != IGNORE_INDEX).sum()),
    )


def make_batch(examples: Sequence[Example], pad_token_id: int, *, packed: bool) -> Batch:
    return pack(examples) if packed else pad(examples, pad_token_id)


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (a 0-dim fp32 tensor).

    Only positions with a target reach the LM head (`logits_to_keep`): with prompt tokens and
    padding excluded that skips most of the vocabulary projection, the largest matmul of a small
    model. The loss is taken in fp32 whatever the compute dtype.
    """
    has_target = batch.targets != IGNORE_INDEX  # [B, S]
    keep = has_target.any(dim=0).nonzero().squeeze(1)  # [K]: positions some row takes loss at
    if keep.numel() == 0:
        return torch.zeros((), device=batch.input_ids.device, requires_grad=True)
    inputs = batch.model_inputs(boundaries_on_device=reads_boundaries_on_device(model))
    logits = model(**inputs, logits_to_keep=keep).logits  # [B, K, V]
    targets = batch.targets[:, keep]  # [B, K]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
