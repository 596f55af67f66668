"""OpenAI's logit shaping, batched like the repetition penalty: `logit_bias` and the additive presence /
frequency penalties.

Only the rows that ask pay for them: the biases are one indexed add over every (row, token) pair, the
penalties one scatter of the generated tokens into per-row counts. As in OpenAI and vLLM the penalties
read the tokens generated so far (not the prompt):

    logit[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]

The sampler applies, in vLLM's order: logit_bias, the repetition penalty, these penalties; then the
warpers. The logprob it reports stays that of the raw model (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.serving.errors import InvalidParameterError
from worker.serving.params import SamplingParams


def check_logit_bias_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias may name only token ids the model has (422 naming `logit_bias` otherwise)."""
    outside = [token for token, _ in params.logit_bias if token >= vocab_size]
    if outside:
        raise InvalidParameterError(
            f"logit_bias token ids must be in [0, {vocab_size}); got {outside[:5]}", field="logit_bias"
        )


def apply_logit_bias(
    scores: torch.Tensor, rows: Sequence[int], params: Sequence[SamplingParams]
) -> torch.Tensor:
    """A copy of `scores` `[B, V]` with each listed row's biases added to its tokens' logits."""
    device, vocab = scores.device, scores.shape[-1]
    # Ids past the logits (an embedding larger than the LM head) cannot be generated; the engine refuses
    # ids outside its vocabulary before a request is queued, so this only guards the indexing.
    pairs = [(row, token, bias) for row in rows for token, bias in params[row].logit_bias if token < vocab]
    out = scores.clone()
    if not pairs:
        return out
    row_index = torch.tensor([row for row, _, _ in pairs], dtype=torch.long, device=device)
    token_index = torch.tensor([token for _, token, _ in pairs], dtype=torch.long, device=device)
    bias = torch.tensor([b for _, _, b in pairs], dtype=scores.dtype, device=device)
    return out.index_put_((row_index, token_index), bias, accumulate=True)


def apply_additive_penalties(
    scores: torch.Tensor,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    generated: Sequence[torch.Tensor | list[int]],
) -> torch.Tensor:
    """A copy of `scores` `[B, V]` where each listed row's logits lose presence * (count > 0) +
    frequency * count, with count[t] how often t is among the row's generated tokens `generated[row]`."""
    device, vocab = scores.device, scores.shape[-1]
    ids = [torch.as_tensor(generated[row], dtype=torch.long, device=device) for row in rows]
    ids = [t[t < vocab] for t in ids]
    lengths = torch.tensor([len(t) for t in ids], device=device)
    local_rows = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
    counts = torch.zeros(len(rows), vocab, dtype=scores.dtype, device=device)  # [R, V]
    if local_rows.numel():
        ones = torch.ones(local_rows.shape[0], dtype=scores.dtype, device=device)
        counts.index_put_((local_rows, torch.cat(ids)), ones, accumulate=True)
    frequency = torch.tensor([params[r].frequency_penalty for r in rows], dtype=scores.dtype, device=device)
    presence = torch.tensor([params[r].presence_penalty for r in rows], dtype=scores.dtype, device=device)
    index = torch.tensor(list(rows), dtype=torch.long, device=device)
    out = scores.clone()
    out[index] = (
        scores[index] - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(scores.dtype)
    )
    return out
