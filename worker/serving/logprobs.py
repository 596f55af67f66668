"""Logprobs beyond each chosen token's own: the most likely alternatives at each generated position, and
the scored prompt, computed inside an engine step for the requests that ask and for no one else.

Everything here reads the raw model distribution, log_softmax of the logits before any penalty or
warper, as the chosen token's logprob does (sampling.py for one token a step, drafting.py's `verify`
for the tokens of a speculating step, which are scored by the verification logits at their positions).
A request that asks for nothing costs nothing: no extra logits, no top-k, no copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from worker.serving.outputs import PromptLogprobs, TopLogprobs
from worker.serving.request import EngineRequest

# A scored prompt's logits are made this many positions at a time: a long prompt's [L, V] float32 logits
# at once would cost L * V * 4 bytes (a 4k prompt over a 150k vocabulary: 2.4 GB).
PROMPT_CHUNK_ROWS = 256


def top_logprobs(logits: torch.Tensor, ks: Sequence[int]) -> list[TopLogprobs]:
    """Per row of `logits` `[N, V]` its `ks[i]` most likely (token, logprob) pairs: one top-k for all."""
    widest = min(max(ks, default=0), logits.shape[-1])
    if widest == 0:
        return [() for _ in ks]
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(widest, dim=-1)
    value_rows, id_rows = values.cpu().tolist(), ids.cpu().tolist()
    return [tuple(zip(id_rows[i][:k], value_rows[i][:k], strict=True)) for i, k in enumerate(ks)]


def step_top_logprobs(
    requests: Sequence[EngineRequest], logits: torch.Tensor, starts: Sequence[int], emitted: Sequence[list]
) -> list[list[TopLogprobs]] | None:
    """Per request, the alternatives of each token it emits this step (its rows start at `starts[i]`, one
    per emitted token: the sampled one's, or a speculating step's verification rows); None if no one asks."""
    asking = [i for i, r in enumerate(requests) if r.seq.params.logprobs > 0 and emitted[i]]
    if not asking:
        return None
    rows = [starts[i] + j for i in asking for j in range(len(emitted[i]))]
    ks = [requests[i].seq.params.logprobs for i in asking for _ in emitted[i]]
    found = iter(top_logprobs(logits[torch.tensor(rows)], ks))
    tops: list[list[TopLogprobs]] = [[] for _ in requests]
    for i in asking:
        tops[i] = [next(found) for _ in emitted[i]]
    return tops


def wants_prompt_scored(request: EngineRequest) -> bool:
    return request.seq.params.prompt_logprobs is not None and not request.prompt_scored


def step_prompt_logprobs(
    requests: Sequence[EngineRequest],
    hidden_tokens: torch.Tensor,
    prefill_lengths: Sequence[int],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> list[PromptLogprobs | None] | None:
    """A prefill step's scored prompts (`hidden_tokens` `[T, D]`: the final-norm hidden state of every fed
    token, sequence after sequence); None for the requests that did not ask, None if none did."""
    if not any(wants_prompt_scored(r) for r in requests):
        return None
    scored: list[PromptLogprobs | None] = []
    start = 0
    for request, length in zip(requests, prefill_lengths, strict=True):
        if wants_prompt_scored(request):
            # A first prefill feeds exactly the prompt; a recompute (prompt_scored already) never gets here.
            prompt = request.seq.prompt_token_ids
            k = request.seq.params.prompt_logprobs or 0
            scored.append(score_prompt(logits_of, hidden_tokens[start : start + len(prompt)], prompt, k))
        else:
            scored.append(None)
        start += length
    return scored


def non_finite(scored: Sequence[PromptLogprobs | None]) -> list[int]:
    """The positions of the scored prompts with a logprob that is not finite (their adapter's doing: the
    step's check of the last rows' logits does not see the prompt's other positions)."""
    return [
        i
        for i, prompt in enumerate(scored)
        if prompt is not None and not all(math.isfinite(v) for v in prompt.logprobs[1:] if v is not None)
    ]


def score_prompt(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, token_ids: list[int], k: int
) -> PromptLogprobs:
    """Each prompt token's logprob given those before it, from the hidden states at the prompt's positions
    `[L, D]` (position p's logits predict token p + 1), with `k` alternatives per position."""
    targets = torch.tensor(token_ids[1:], dtype=torch.long, device=hidden.device)
    logprobs: list[float | None] = [None]
    tops: list[TopLogprobs] = [()]
    for start in range(0, len(token_ids) - 1, PROMPT_CHUNK_ROWS):
        rows = hidden[start : min(start + PROMPT_CHUNK_ROWS, len(token_ids) - 1)]
        log_probs = torch.log_softmax(logits_of(rows).float(), dim=-1)  # [rows, V]
        chosen = log_probs.gather(1, targets[start : start + rows.shape[0], None]).squeeze(1)
        logprobs.extend(chosen.cpu().tolist())
        tops.extend(top_logprobs(log_probs, [k] * rows.shape[0]) if k else [() for _ in range(rows.shape[0])])
    return PromptLogprobs(tuple(token_ids), tuple(logprobs), tuple(tops))
