"""The acceptance rules of speculative decoding: which drafts a verifying step keeps, and the token after.

A speculating sequence feeds its last emitted token plus K drafts d_1..d_K; the model's logits at
those K + 1 positions say what it would emit after each prefix. Greedy requests keep

    accepted = longest a such that drafts[:a] == argmax(logits[:a])
    emitted  = drafts[:a] + [argmax(logits[a])]          # always at least one token

which is token for token what non-speculative greedy decoding produces. Sampled requests use
speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023), which leaves the output
distribution exactly that of ordinary sampling. With p_i the request's processed (temperature, top-k,
top-p) distribution of the model after the prefix ending at draft i - 1, and q_i the distribution the
speculator drew d_i from:

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), and go on to the next draft;
    at the first rejection emit a token drawn from normalise(max(0, p_i - q_i)) and stop;
    if every draft is accepted, emit one more token drawn from p_K.

A seeded request stays reproducible, but draws different tokens than without speculation (the random
stream is consumed differently); the distribution is the same. Every speculator kind (Medusa heads,
an eagle draft layer) is verified by these functions.
"""

from __future__ import annotations

import torch

from worker.serving.params import SamplingParams
from worker.serving.sampling import draw, warped_probs


def accept_greedy(drafts: list[int], verified: list[int]) -> list[int]:
    """The tokens a speculating step emits: the drafts greedy decoding confirms, then its own next token.

    `verified[i]` is the model's greedy token after the prefix ending at draft i - 1 (len(drafts) + 1
    of them).
    """
    emitted = []
    for draft, model_choice in zip(drafts, verified, strict=False):
        if draft != model_choice:
            break
        emitted.append(draft)
    emitted.append(verified[len(emitted)])
    return emitted


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) for a draft d (scalars); q(d) > 0 since d was drawn from q."""
    return (p_draft / q_draft.clamp(min=1e-20)).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)) `[V]` from p, q `[V]`: what to draw from after a rejection."""
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the residual
        residual = p
    return residual / residual.sum()


def accept_sampled(
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative rejection sampling (module docstring): `draft_probs` q `[>=len(drafts), V]`,
    `logits` the model's `[len(drafts) + 1, V]` at the fed positions."""
    p = warped_probs(logits.float(), [params] * logits.shape[0])  # [K + 1, V]
    emitted: list[int] = []
    for i, draft in enumerate(drafts):
        assert draft_probs is not None, "drafts come with the distributions they were drawn from"
        accept = acceptance_probability(p[i, draft], draft_probs[i, draft])
        if float(torch.rand(1, generator=generator)) < float(accept):
            emitted.append(draft)
            continue
        emitted.append(int(draw(residual_distribution(p[i], draft_probs[i])[None], [generator])[0]))
        return emitted
    emitted.append(int(draw(p[len(drafts)][None], [generator])[0]))
    return emitted
