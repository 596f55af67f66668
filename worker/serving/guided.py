"""Constrained decoding with llguidance: each request's `Constraint` compiled once (an LRU cache keyed by
the constraint), and per request the matcher that says which tokens may come next.

Compiling happens where the request arrives (`GrammarCompiler.compile`, on a worker thread of the HTTP
server), so a bad or unsatisfiable schema is a 400 naming its field before the engine sees the request.
The engine thread copies the compiled matcher for each request (`start`), asks it for the allowed tokens
of each step (`allowed_tokens`) and advances it with each emitted token (`GuideState.advance`).
llguidance bounds both compilation and each step's work (`LIMITS`): a grammar past them fails only its
own request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from worker.serving.errors import GrammarError
from worker.serving.output_constraint import Constraint

# Compiled grammars kept for reuse; each is a matcher in its initial state (a few hundred kB at most).
GRAMMAR_CACHE_SIZE = 128
# Tighter than llguidance's defaults where a request could make compilation slow: lexer fuel runs at
# ~50k/ms, so compiling stops after ~20 ms of regex work; each step's mask stays within ~15 ms.
LIMITS_SETTINGS: dict[str, Any] = {
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 50_000,
    "max_grammar_size": 100_000,
    "verbose_errors": False,  # errors go back to the caller: no parser state in them
}
# JSON as models write it ("a": 1, "b": 2) and nothing else: flexible whitespace would let a sampled
# request wander through endless blanks.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 300


class GrammarCompiler:
    """Compiles constraints against one tokenizer, caching the result; safe from any thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (about a second): a deployment nobody constrains never pays for it.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                )
            return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """The constraint's matcher in its initial state (shared: copy it before use); GrammarError
        naming the constraint's field if it does not compile or allows no output at all."""
        with self._lock:
            cached = self._cache.get(constraint.key)
            if cached is not None:
                self._cache.move_to_end(constraint.key)
                return cached
        matcher = self._build(constraint)
        with self._lock:
            self._cache[constraint.key] = matcher
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def start(self, constraint: Constraint) -> GuideState:
        """A fresh matcher for one request."""
        return GuideState(self.compile(constraint).deep_copy(), constraint)

    def _build(self, constraint: Constraint) -> llguidance.LLMatcher:
        field = constraint.field
        try:
            if constraint.kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    constraint.spec, defaults=JSON_OPTIONS
                )
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(constraint.spec)
            matcher = llguidance.LLMatcher(
                self._tokenizer(), grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS_SETTINGS)
            )
        except ValueError as exc:  # not a schema llguidance can read
            raise GrammarError(f"{field} is not a usable grammar: {_short(str(exc))}", field=field) from None
        if matcher.is_error():
            raise GrammarError(
                f"{field} is not a usable grammar: {_short(matcher.get_error())}", field=field
            ) from None
        # A grammar whose first step admits only the end (or nothing) can never produce its output.
        first = _allowed(matcher, self.vocab_size) & _not_eos(self.vocab_size, self.eos_token_ids)
        if not matcher.is_accepting() and not bool(first.any()):
            raise GrammarError(
                f"{field} cannot be satisfied by this model's tokens (or is too complex to start)",
                field=field,
            )
        return matcher


class GuideState:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, constraint: Constraint) -> None:
        self.matcher = matcher
        self.constraint = constraint

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool `[V]`: the tokens the grammar allows next; GrammarError if the matcher failed (a step past
        its limits)."""
        allowed = _allowed(self.matcher, vocab_size)
        self._check()
        return allowed

    def advance(self, token: int) -> bool:
        """Consumes an emitted token; True once the grammar is complete (nothing but the end may follow)."""
        if not self.matcher.consume_token(token):
            self._check()
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            field = self.constraint.field
            raise GrammarError(
                f"{field}: generation stopped inside the grammar ({_short(self.matcher.get_error())})",
                field=field,
            )


def allowed_tokens(
    guides: Sequence[GuideState | None], vocab_size: int
) -> tuple[torch.Tensor, dict[int, GrammarError]]:
    """Bool `[B, V]` of each row's allowed tokens (every token for an unconstrained row), and the rows
    whose grammar failed or allows nothing at all: those requests must end with the error, not sample."""
    mask = torch.ones(len(guides), vocab_size, dtype=torch.bool)
    failed: dict[int, GrammarError] = {}
    for row, guide in enumerate(guides):
        if guide is None:
            continue
        try:
            mask[row] = guide.allowed(vocab_size)
        except GrammarError as exc:
            failed[row] = exc
            continue
        if not bool(mask[row].any()):
            field = guide.constraint.field
            failed[row] = GrammarError(f"{field}: the grammar allows no further token here", field=field)
    return mask, failed


def _allowed(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    # One bit per token, least significant first within each little-endian 32-bit word.
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab_size].astype(np.bool_))


def _not_eos(vocab_size: int, eos_token_ids: list[int]) -> torch.Tensor:
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[t for t in eos_token_ids if t < vocab_size]] = False
    return keep


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "…"
