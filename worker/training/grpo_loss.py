"""GRPO's math as pure functions: group-normalised advantages and the clipped policy-gradient loss with a
KL penalty to the reference (DeepSeekMath, arXiv 2402.03300, eq. 3-4; TRL's GRPOTrainer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Added to a group's standard deviation: a group whose rewards are all equal gets advantages of 0, not NaN.
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = (r - mean_group) / (std_group + eps) for rewards `[P, G]` (P prompts, G completions each).

    The standard deviation is the unbiased one, as TRL computes it.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True)  # [P, 1]
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) `[N, L]` for logits `[N, L, V]` predicting tokens `[N, L]` (fp32)."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, L]
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class PolicyLoss:
    """Per completion `[N]`: the loss (mean over its tokens), the KL estimate and the share of clipped
    tokens (both means over its tokens, for metrics)."""

    loss: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_epsilon: float,
    beta: float,
) -> PolicyLoss:
    """GRPO's per-completion loss. Per token t of completion i (`[N, L]` tensors, `mask` 1 on completion
    tokens, `advantages` `[N]`):

        ratio = exp(logp - logp_old)                 # logp_old: the sampling-time policy's
        pg    = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i)
        kl    = exp(logp_ref - logp) - (logp_ref - logp) - 1     # k3: unbiased, never negative
        loss_i = mean over the completion's tokens of (pg + beta * kl)

    Averaged per token within a completion, then (by the caller) per completion, as in the GRPO paper:
    each completion weighs the same whatever its length.
    """
    ratio = torch.exp(logps - old_logps)  # [N, L]
    adv = advantages.unsqueeze(1)  # [N, 1]
    clipped_ratio = torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
    pg = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, L]
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1  # [N, L]
    mask = mask.to(logps.dtype)
    count = mask.sum(dim=1).clamp(min=1)  # [N]
    loss = ((pg + beta * kl) * mask).sum(dim=1) / count
    was_clipped = ((ratio < 1 - clip_epsilon) & (adv < 0)) | ((ratio > 1 + clip_epsilon) & (adv > 0))
    return PolicyLoss(
        loss=loss,
        kl=(kl.detach() * mask).sum(dim=1) / count,
        clipped=(was_clipped.to(mask.dtype) * mask).sum(dim=1) / count,
    )
