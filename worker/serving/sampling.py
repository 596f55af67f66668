"""Next-token choice for one engine step: per-row penalties, temperature, top-k/top-p and seeded draws.

Rows are grouped, not looped over: an all-greedy batch without penalties is one argmax, penalties are
one scatter over the concatenated histories, and the warpers and the draw run on the sampled rows
together. Only one uniform number per seeded row comes from that row's own generator, so a seeded
request's tokens do not depend on its batch companions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.serving.params import SamplingParams
from worker.serving.penalties import apply_additive_penalties, apply_logit_bias


def make_generator(seed: int | None) -> torch.Generator | None:
    """The (CPU) generator a seeded request draws from for its whole life; None means the global RNG."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed)


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[torch.Tensor | list[int]],
    generators: Sequence[torch.Generator | None],
    generated: Sequence[torch.Tensor | list[int]] | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[B]` (long) and their logprobs `[B]` (float32) for logits `[B, V]`.

    `allowed` (bool `[B, V]`), if given, limits each row to its grammar's tokens (guided.py); every row
    must allow at least one.

    `histories[i]` is row i's prompt + generated ids (for the repetition penalty), `generated[i]` its
    generated ids alone (for the presence and frequency penalties; needed only if a row has them). The
    logprob is that of the raw model distribution at the chosen token, before any bias, penalty, mask or
    warper, as vLLM reports it by default.
    """
    batch = logits.shape[0]
    if not (len(params) == len(histories) == len(generators) == batch):
        raise ValueError(
            f"sample_next_tokens: {batch} logit rows but {len(params)} params, "
            f"{len(histories)} histories and {len(generators)} generators"
        )
    raw = logits.float()  # [B, V]
    log_normaliser = torch.logsumexp(raw, dim=-1)  # [B]

    scores = shape_logits(raw, params, histories, generated)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        tokens = scores.argmax(dim=-1)  # [B]
    else:
        tokens = torch.empty(batch, dtype=torch.long, device=raw.device)
        if len(sampled) < batch:
            greedy_rows = torch.tensor(
                [i for i in range(batch) if params[i].greedy], dtype=torch.long, device=raw.device
            )
            tokens[greedy_rows] = scores[greedy_rows].argmax(dim=-1)
        rows = torch.tensor(sampled, dtype=torch.long, device=raw.device)
        probs = warped_probs(scores[rows], [params[i] for i in sampled])  # [S, V]
        tokens[rows] = draw(probs, [generators[i] for i in sampled])

    logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_normaliser  # [B]
    return tokens, logprobs


def shape_logits(
    raw: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[torch.Tensor | list[int]],
    generated: Sequence[torch.Tensor | list[int]] | None = None,
) -> torch.Tensor:
    """`raw` `[B, V]` after each row's logit_bias, repetition penalty and presence / frequency penalties
    (vLLM's order); `raw` itself when no row asks for any."""
    scores = raw
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        scores = apply_logit_bias(scores, biased, params)
    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalised:
        scores = apply_repetition_penalty(scores, penalised, params, histories)
    additive = [i for i, p in enumerate(params) if p.additive_penalties]
    if additive:
        if generated is None:
            raise ValueError("presence / frequency penalties need each row's generated tokens")
        scores = apply_additive_penalties(scores, additive, params, generated)
    return scores


def apply_repetition_penalty(
    scores: torch.Tensor,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    histories: Sequence[torch.Tensor | list[int]],
) -> torch.Tensor:
    """A copy of `scores` `[B, V]` where each listed row's seen tokens are penalised CTRL-style:
    a positive logit divided by the penalty, a negative one multiplied (HF's processor)."""
    device = scores.device
    vocab = scores.shape[-1]
    ids = [torch.as_tensor(histories[i], dtype=torch.long, device=device) for i in rows]
    # Ids past the logits (an embedding larger than the LM head) cannot be generated: HF skips them too.
    ids = [t[t < vocab] for t in ids]
    counts = torch.tensor([len(t) for t in ids], device=device)
    row_index = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long, device=device), counts)
    token_index = torch.cat(ids)  # [N]: every (row, seen token) pair; repeats write the same value
    penalty = torch.repeat_interleave(
        torch.tensor([params[i].repetition_penalty for i in rows], dtype=scores.dtype, device=device), counts
    )
    seen = scores[row_index, token_index]  # [N]
    out = scores.clone()
    out[row_index, token_index] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return out


def warped_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities `[S, V]` after temperature, then top-k, then top-p, in HF's order and semantics."""
    device = scores.device
    temperature = torch.tensor([p.temperature for p in params], dtype=scores.dtype, device=device)
    scores = scores / temperature.unsqueeze(1)
    vocab = scores.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        scores = _top_k(scores, [p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    probs = scores.softmax(dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        probs[nucleus] = _top_p(probs[nucleus], [params[i].top_p for i in nucleus])
    return probs


def _top_k(scores: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    # Like HF's TopKLogitsWarper: keep everything >= the k-th largest value (ties at the cut stay).
    k = torch.tensor(top_k, dtype=torch.long, device=scores.device).unsqueeze(1)  # [S, 1]
    largest = scores.topk(max(top_k), dim=-1).values  # [S, max k]; a full sort costs far more on CPU
    kth = largest.gather(1, k - 1)  # [S, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


# The nucleus is looked for among this many most likely tokens first; a full sort only if it is wider.
_TOP_P_CANDIDATES = 1024


def _top_p(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Like HF's TopPLogitsWarper: drop the least likely tokens whose total mass is <= 1 - top_p
    (always keeping the most likely one), then renormalise. `probs` `[S, V]`."""
    # 1 - top_p in Python floats, as HF computes it.
    mass = torch.tensor([1 - p for p in top_p], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    vocab = probs.shape[-1]
    candidates, order = probs.topk(min(vocab, _TOP_P_CANDIDATES), dim=-1)  # [S, K] descending
    outside = (1 - candidates.sum(dim=-1, keepdim=True)).clamp(min=0)  # [S, 1]
    # The tokens outside the candidates are all dropped only if their mass is below the cut (with a
    # margin for rounding); otherwise sort everything, as HF does.
    if candidates.shape[-1] < vocab and bool((outside > mass - 1e-5).any()):
        candidates, order = probs.sort(dim=-1, descending=True)
        outside = torch.zeros_like(outside)
    ascending = candidates.flip(-1)
    remove = outside + ascending.cumsum(dim=-1) <= mass  # [S, K] ascending
    remove[:, -1] = False
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep.scatter_(1, order, ~remove.flip(-1))
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row `[S]` by inverting each row's CDF at a uniform draw from the row's own
    generator (the global RNG for unseeded rows). One float per row comes from the generator, so a
    seeded request's tokens do not depend on its companions; the search itself is batched (batched
    `torch.multinomial` costs per row over a large vocabulary on CPU what this costs for all rows)."""
    uniform = torch.empty(probs.shape[0], 1)  # on the CPU, where the generators live
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        uniform[unseeded, 0] = torch.rand(len(unseeded))
    for i, generator in enumerate(generators):
        if generator is not None:
            uniform[i] = torch.rand(1, generator=generator)
    cdf = probs.cumsum(dim=-1)  # [S, V], non-decreasing, flat over zero-probability tokens
    # u in (0, 1] times the total: the first index whose CDF reaches it has a non-zero probability.
    target = (1 - uniform).to(probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[-1] - 1)
