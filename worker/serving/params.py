"""Per-request sampling parameters and the bounds of every request field, checked once at the edge so the
engine loop never sees a bad value.

The HTTP schemas (openai_routes.py, lorax_routes.py) bound their fields with these constants where the
body is parsed; `SamplingParams` checks them again, so that no caller (a test, a bench, a future route)
can hand the engine thread a value it would choke on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.serving.errors import InvalidParameterError
from worker.serving.output_constraint import Constraint

# torch.Generator seeds are 64-bit; vLLM bounds them by torch.iinfo(torch.long) too.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Above any model's context (the real limit, checked once the prompt is tokenized).
MAX_TOKENS_LIMIT = 1 << 20
# Above any vocabulary; the sampler clamps a larger top_k to the vocabulary.
MAX_TOP_K = 1 << 20
# logits / T must stay finite: far above any useful value (OpenAI caps at 2), and below it, temperatures
# under GREEDY_TEMPERATURE sample greedily (vLLM's rule) because 1/T would overflow float32.
MAX_TEMPERATURE = 100.0
GREEDY_TEMPERATURE = 1e-5
# CTRL-style penalties divide or multiply logits: these keep them finite.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# OpenAI's range for presence / frequency penalties (refused anyway unless 0).
MAX_ABS_PENALTY = 2.0
# Stop strings longer than this would make every streamed token wait for the hold-back window.
MAX_STOP_LENGTH = 256
MAX_STOP_SEQUENCES = 8
# A prompt is bounded before it is tokenized (characters) and after (the model's context); a prompt
# of token ids by its length. Both are far above any context served here.
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPT_TOKEN_IDS = 1 << 17
MAX_TOKEN_ID = 2**31 - 1
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
# Counts a request may ask for that are refused unless 1 (n, best_of).
MAX_CHOICES = 128
# Alternatives reported per position (OpenAI's top_logprobs limit; vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# Names (models, adapter ids, roles) and other short strings.
MAX_NAME_LENGTH = 256
# Constrained decoding (response_format, guided_regex, tools): a schema's size as compact JSON and its
# nesting, a regex's length, and the tools a chat request may declare. Grammars of this size compile in
# milliseconds; llguidance's own limits (guided.py) bound what a small text could still blow up.
MAX_SCHEMA_BYTES = 64 << 10
MAX_SCHEMA_DEPTH = 32
MAX_REGEX_CHARS = 4096
MAX_TOOLS = 64
# Embeddings: inputs per request and their tokens in all (OpenAI's limits); each input is also bounded
# by the model's context.
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_TOKENS = 300_000
# `dimensions` is refused unless it equals the hidden size; this only bounds the number parsed.
MAX_EMBEDDING_DIMENSIONS = 1 << 16
# The whole request body; a bigger one is answered 413 before it is parsed.
DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. `temperature == 0` (or `do_sample=False`) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; CTRL-style, as HF and LoRAX apply it
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    do_sample: bool = True  # LoRAX's switch; False forces greedy whatever the temperature
    constraint: Constraint | None = None  # a grammar the output must match (constraints.py)
    # The most likely alternatives reported with each generated token (0: only its own logprob).
    logprobs: int = 0
    # None: the prompt is not scored; k: each prompt token's logprob, with k alternatives (logprobs.py).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens", f"must be in 1..{MAX_TOKENS_LIMIT}")
        _check(
            _finite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"must be in [0, {MAX_TEMPERATURE:g}] (0 means greedy)",
        )
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(0 <= self.top_k <= MAX_TOP_K, "top_k", f"must be in 0..{MAX_TOP_K} (0 turns it off)")
        _check(
            _finite(self.repetition_penalty)
            and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1.0 turns it off)",
        )
        _check(
            self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
            "seed",
            f"must be a 64-bit integer ({SEED_MIN}..{SEED_MAX})",
        )
        _check(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in 0..{MAX_LOGPROBS}")
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
            "prompt_logprobs",
            f"must be in 0..{MAX_LOGPROBS}",
        )
        _check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} sequences")
        for s in self.stop:
            _check(
                0 < len(s) <= MAX_STOP_LENGTH, "stop", f"each stop string needs 1..{MAX_STOP_LENGTH} chars"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{field} {message}", field=field)
