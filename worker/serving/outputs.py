"""What the engine hands back per request: one `TokenOutput` per generated token (the last one finished)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_tokens reached
    EOS = "eos_token"  # the model's end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings appeared
    ABORTED = "aborted"  # the client went away or the engine shut down


@dataclass(frozen=True)
class SpeculationStats:
    """A request's speculative decoding so far: verification steps, drafts proposed, drafts kept."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (the accepted drafts plus the model's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
        }


# The most likely tokens at one position, (token id, logprob), most likely first.
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's logprob given the tokens before it (None for the first, which has none), and
    the most likely alternatives at each position (empty for the first, or when none were asked)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top: tuple[TopLogprobs, ...]


@dataclass(frozen=True)
class TokenOutput:
    """One generated token. `text` is the new text it completes (it can be "" while a multi-byte
    character or a possible stop string is held back, and the last output flushes what is left)."""

    token_id: int
    text: str
    logprob: float
    special: bool
    index: int  # 0-based position among the generated tokens
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    # Time from submission to this token (seconds); the first one is the time to first token.
    elapsed: float = 0.0
    speculation: SpeculationStats | None = None  # so far, for requests whose adapter has a speculator
    # Why the adapter's speculator does not run (an engine without tuneforge's speculators); the routes
    # send it as the X-Tuneforge-Speculation response header.
    speculation_note: str | None = None
    # What the request asked for besides the token's own logprob (SamplingParams.logprobs and
    # .prompt_logprobs): its alternatives, and on the first output only, the scored prompt.
    top_logprobs: TopLogprobs = ()
    prompt_logprobs: PromptLogprobs | None = None
    # Which of the request's n choices this token belongs to (0 when n = 1).
    choice: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
