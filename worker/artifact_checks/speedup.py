"""Owns the measured speedup of a published turbo artifact: the serving engine decodes held-out prompts
greedily, one request at a time, with the artifact's speculator and without it.

Cost, bounded: at most MAX_PROMPTS prompts x MAX_NEW_TOKENS tokens in each of the two modes, plus one
short warm-up request per mode: at most 2 x (8 x 32 + 8) generated tokens, on the engine the other
checks share (served_engine.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.artifact_checks.served_engine import ServedArtifact, generate
from worker.training import speculator_phase
from worker.training.quality import HELD_OUT_PROMPTS

log = logging.getLogger(__name__)

MAX_PROMPTS = HELD_OUT_PROMPTS  # a run hands back at most this many
# The training-time estimate replays exactly these requests (worker/training/speculator_phase.py).
MAX_NEW_TOKENS = speculator_phase.MAX_NEW_TOKENS
WARMUP_TOKENS = 8  # first-request costs (thread pools, LoRA stacks) are not what a deployment pays per token


@dataclass(frozen=True)
class _Pass:
    """One mode's decoding: outputs, decode tokens (each request's first, the prefill's, left out) and
    their time, and the engine's speculation counters over the pass."""

    outputs: list[list[int]]
    decode_tokens: int
    decode_seconds: float
    spec_steps: float
    spec_drafted: float
    spec_accepted: float


def chosen_prompts(prompts: Sequence[list[int]]) -> list[list[int]]:
    """The prompts a measurement decodes (the engine must hold each plus MAX_NEW_TOKENS)."""
    return list(prompts[:MAX_PROMPTS])


def measure(served: ServedArtifact, prompts: Sequence[list[int]]) -> dict[str, Any]:
    """The `measured` entry of the speculator summary; `{"error": ...}` when the engine cannot do it.

    A failure here never fails the training run: the artifact is good whether or not it was timed.
    """
    try:
        chosen = chosen_prompts(prompts)
        if not chosen:
            raise ValueError("no held-out prompt to decode")
        plain = _decode(served, chosen, served.lora_only_id)
        speculative = _decode(served, chosen, served.artifact_id)
        # How it was measured, so the headline number can be read for what it is.
        settings = {"dtype": served.dtype, "device": served.device, "batch_size": 1, "temperature": 0.0}
        return _result(chosen, plain, speculative) | {"engine": settings}
    except Exception as exc:
        log.exception("measuring the speculator's speedup failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _decode(served: ServedArtifact, prompts: list[list[int]], adapter_id: str | None) -> _Pass:
    """Greedy, one request after another, after one short warm-up request that is not counted."""
    engine = served.engine
    generate(engine, prompts[0], adapter_id, WARMUP_TOKENS)
    metrics = engine.metrics
    counters = (metrics.spec_steps, metrics.spec_drafted, metrics.spec_accepted)
    before = [counter._value.get() for counter in counters]
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        generated = generate(engine, prompt, adapter_id, MAX_NEW_TOKENS)
        outputs.append([output.token_id for output in generated])
        tokens += len(generated) - 1
        seconds += generated[-1].elapsed - generated[0].elapsed
    steps, drafted, accepted = (counter._value.get() - b for counter, b in zip(counters, before, strict=True))
    return _Pass(outputs, tokens, seconds, steps, drafted, accepted)


def _result(prompts: list[list[int]], plain: _Pass, speculative: _Pass) -> dict[str, Any]:
    if plain.decode_seconds <= 0 or speculative.decode_seconds <= 0:
        raise ValueError("every output ended after its first token: no decoding to time")
    plain_rate = plain.decode_tokens / plain.decode_seconds
    speculative_rate = speculative.decode_tokens / speculative.decode_seconds
    steps = speculative.spec_steps
    return {
        "prompts": len(prompts),
        "max_new_tokens": MAX_NEW_TOKENS,
        "plain_tokens_per_s": round(plain_rate, 2),
        "speculative_tokens_per_s": round(speculative_rate, 2),
        "speedup": round(speculative_rate / plain_rate, 3),
        # Tokens emitted per verification step (the accepted drafts plus the model's own token).
        "mean_accepted_length": round((speculative.spec_accepted + steps) / steps, 3) if steps else 1.0,
        "acceptance_rate": (
            round(speculative.spec_accepted / speculative.spec_drafted, 3)
            if speculative.spec_drafted
            else 0.0
        ),
        # Greedy speculation must emit exactly what plain greedy decoding does.
        "identical_outputs": sum(a == b for a, b in zip(plain.outputs, speculative.outputs, strict=True)),
    }
