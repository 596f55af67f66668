"""Per-request sampling parameters and the bounds of every request field, checked once at the edge so the
engine loop never sees a bad value.

The HTTP schemas (openai_routes.py, lorax_routes.py) bound their fields with these constants where the
body is parsed; `SamplingParams` checks them again, so that no caller (a test, a bench, a future route)
can hand the engine thread a value it would choke on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.serving.errors import InvalidParameterError, PromptTooLongError
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
# OpenAI's range for presence / frequency penalties, and for logit_bias values and entries.
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
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
# Choices one request may ask for (n, best_of), and prompts one /v1/completions request may list.
MAX_CHOICES = 128
MAX_PROMPTS = 64
# A request with n > 1 may hold at most this share of the engine's KV cache (prompt and completions of
# all its choices, at their longest) and of its batch slots, so that one request cannot starve every
# other tenant.
MAX_CHOICES_SHARE = 0.5
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
# Texts one /classify_batch request classifies (each is a row of the pass, like an embedding input).
MAX_CLASSIFY_INPUTS = 256
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
    # OpenAI's additive penalties over the tokens generated so far (0 = off), and biases added to the
    # logits of given token ids ((token id, bias) pairs; the engine checks the ids against its vocabulary).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Choices generated from one prefill of the prompt (forked after it); choice j draws from seed + j.
    n: int = 1
    # Who may reuse this request's cached prompt KV (prefix caching): the tenant, set by the serving
    # routes from the signed assertion, never by a client. A prefix one tenant cached is never reused
    # for another (a cache hit shows in the time to first token, so sharing would tell one tenant what
    # another sent); adapters are tenant-qualified already.
    cache_scope: str | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _finite(value) and -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY,
                name,
                f"must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}] (0 turns it off)",
            )
        _check(
            len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
            "logit_bias",
            f"takes at most {MAX_LOGIT_BIAS_ENTRIES} token ids",
        )
        for token, bias in self.logit_bias:
            _check(
                isinstance(token, int) and 0 <= token <= MAX_TOKEN_ID,
                "logit_bias",
                f"keys must be token ids (integers in 0..{MAX_TOKEN_ID}); got {token!r}",
            )
            _check(
                _finite(bias) and -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS,
                "logit_bias",
                f"values must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]; got {bias!r}",
            )
        _check(1 <= self.n <= MAX_CHOICES, "n", f"must be in 1..{MAX_CHOICES}")
        _check(
            self.cache_scope is None or len(self.cache_scope) <= MAX_NAME_LENGTH,
            "cache_scope",
            f"at most {MAX_NAME_LENGTH} characters",
        )
        _check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} sequences")
        for s in self.stop:
            _check(
                0 < len(s) <= MAX_STOP_LENGTH, "stop", f"each stop string needs 1..{MAX_STOP_LENGTH} chars"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def additive_penalties(self) -> bool:
        """Whether the presence or frequency penalty is on (both read the generated tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but the warpers changes the logits (the speculative path does not apply it)."""
        return self.repetition_penalty != 1.0 or self.additive_penalties or bool(self.logit_bias)

    def choice_seed(self, choice: int) -> int | None:
        """Choice j of a seeded request draws from seed + j (wrapped into 64 bits): choice 0 is what n=1
        gives, and every choice is reproducible and distinct from its siblings."""
        if self.seed is None:
            return None
        return (self.seed + choice - SEED_MIN) % 2**64 + SEED_MIN


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{field} {message}", field=field)


def check_prompt_fits(
    prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, context: int
) -> None:
    """What every engine checks of a tokenized request before queueing it, with the same messages: a
    non-empty prompt of ids in the vocabulary, and prompt + max_tokens within the model's context."""
    if not prompt_token_ids:
        raise InvalidParameterError("the prompt is empty", field="prompt")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise InvalidParameterError(f"prompt token ids must be in [0, {vocab_size})", field="prompt")
    total = len(prompt_token_ids) + params.max_tokens
    if total > context:
        raise PromptTooLongError(
            f"this model's context is {context} tokens, but the request needs {total} "
            f"({len(prompt_token_ids)} in the prompt + max_tokens {params.max_tokens}); "
            "shorten the prompt or lower max_tokens",
            field="max_tokens" if len(prompt_token_ids) < context else "prompt",
        )
