"""Constrained decoding in tuneforge's engine: grammar-masked rows in a mixed batch of adapters, against
a masked greedy reference computed with HF's logits, and grammars that fail only their own request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from engine_support import Collected, make_engine, run_until_done
from peft import PeftModel
from transformers import AutoModelForCausalLM

from worker.serving.constraints import json_constraint, regex_constraint
from worker.serving.engine import LLMEngine
from worker.serving.errors import GrammarError
from worker.serving.guided import GrammarCompiler
from worker.serving.outputs import FinishReason
from worker.serving.params import MAX_SCHEMA_DEPTH, SamplingParams

PROMPT = [1, 422, 3171, 6354, 28705, 15797, 16979]
# Bounded strings and numbers, so that a random model's sampled output ends well within max_tokens.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
ADAPTERS = [None, "acme/1", "acme/2", "acme/3", "acme/4"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapter_root: Path) -> LLMEngine:
    return make_engine(tiny_model_dir, adapter_root, max_batch_size=48)


def _text(c: Collected) -> str:
    return "".join(o.text for o in c.outputs)


def _constrained(schema: dict[str, Any], **params: Any) -> SamplingParams:
    return SamplingParams(constraint=json_constraint(schema, "response_format"), **params)


def test_sampled_json_schema_outputs_validate_in_a_mixed_batch_and_free_rows_are_untouched(
    engine: LLMEngine,
) -> None:
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [Collected(engine, PROMPT, free, adapter) for adapter in ADAPTERS]
    run_until_done(engine, alone)

    constrained = [
        Collected(
            engine, PROMPT, _constrained(PERSON, max_tokens=120, temperature=1.0, seed=i), ADAPTERS[i % 5]
        )
        for i in range(30)
    ]
    mixed_free = [Collected(engine, PROMPT, free, adapter) for adapter in ADAPTERS]
    run_until_done(engine, constrained + mixed_free)

    for c in constrained:
        assert c.error is None
        assert c.outputs[-1].finish_reason is FinishReason.EOS, _text(c)
        jsonschema.validate(json.loads(_text(c)), PERSON)
    assert len({_text(c) for c in constrained}) > 10  # sampled, not one forced string
    # The rows without a grammar decode exactly as they do without constrained companions.
    assert [c.token_ids for c in mixed_free] == [c.token_ids for c in alone]


def _masked_hf_greedy(
    model_dir: Path, adapter_dir: Path | None, compiler: GrammarCompiler, schema: dict[str, Any], limit: int
) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand: HF's (PEFT's) logits, masked by a fresh matcher of the same grammar."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    guide = compiler.start(json_constraint(schema, "response_format"))
    ids, tokens, logprobs = list(PROMPT), [], []
    with torch.no_grad():
        for _ in range(limit):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            allowed = guide.allowed(logits.shape[-1])
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
            if guide.advance(token) or token == 2:
                break
    return tokens, logprobs


@pytest.mark.parametrize("adapter", [None, "acme/2"])
def test_greedy_constrained_output_equals_masked_greedy_from_hf_logits(
    engine: LLMEngine, tiny_model_dir: Path, adapter_root: Path, adapter: str | None
) -> None:
    compiler = GrammarCompiler(engine.tokenizer, engine.runner.vocab_size, engine.runner.eos_token_ids)
    expected, expected_logprobs = _masked_hf_greedy(
        tiny_model_dir, adapter_root / adapter if adapter else None, compiler, PERSON, 120
    )
    greedy = Collected(engine, PROMPT, _constrained(PERSON, max_tokens=120, temperature=0), adapter)
    free = Collected(engine, PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=3), "acme/1")
    run_until_done(engine, [greedy, free])
    assert greedy.token_ids == expected
    # The logprob reported is the raw model's, not the masked distribution's.
    assert [o.logprob for o in greedy.outputs] == pytest.approx(expected_logprobs, abs=1e-4)
    jsonschema.validate(json.loads(_text(greedy)), PERSON)


def test_regex_constrained_output_matches_the_pattern(engine: LLMEngine) -> None:
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    collected = [
        Collected(
            engine,
            PROMPT,
            SamplingParams(
                max_tokens=40, temperature=1.0, seed=i, constraint=regex_constraint(pattern, "guided_regex")
            ),
            ADAPTERS[i % 5],
        )
        for i in range(6)
    ]
    run_until_done(engine, collected)
    for c in collected:
        assert c.error is None and re.fullmatch(pattern, _text(c)), _text(c)


def test_a_grammar_that_fails_mid_generation_ends_only_its_request(engine: LLMEngine) -> None:
    broken = Collected(
        engine,
        PROMPT,
        SamplingParams(max_tokens=10, temperature=0, constraint=regex_constraint("[0-9]+", "guided_regex")),
        None,
    )
    # A token the grammar forbids puts the matcher in its error state, as a step past llguidance's
    # limits does: the next step must end this request with the grammar's error, and only this one.
    assert broken.request.guide is not None
    assert not broken.request.guide.matcher.consume_token(engine.tokenizer.convert_tokens_to_ids("x"))
    other = Collected(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "acme/1")
    run_until_done(engine, [broken, other])
    assert isinstance(broken.error, GrammarError) and broken.error.field == "guided_regex"
    assert not broken.outputs
    assert other.error is None and len(other.outputs) == 8


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 5, "maxLength": 2},  # unsatisfiable
        {"type": "strin"},  # no such type
        {"$ref": "#"},  # refers only to itself: no value can ever end
        {"type": "object", "properties": {"a": {"pattern": "(abc", "type": "string"}}},
    ],
)
def test_a_bad_or_unsatisfiable_schema_is_refused_at_compile_naming_the_field(
    engine: LLMEngine, schema: dict[str, Any]
) -> None:
    with pytest.raises(GrammarError) as caught:
        engine.grammars.compile(json_constraint(schema, "response_format"))
    assert caught.value.field == "response_format" and caught.value.status_code == 400


def test_a_schema_too_deep_or_too_large_is_refused_before_compiling() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(GrammarError, match="levels deep"):
        json_constraint(deep, "response_format")
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(GrammarError, match="bytes"):
        json_constraint(huge, "response_format")
    with pytest.raises(GrammarError, match="characters"):
        regex_constraint("a" * 5000, "guided_regex")


def test_compiled_grammars_are_cached_by_constraint(engine: LLMEngine) -> None:
    first = engine.grammars.compile(json_constraint(PERSON, "response_format"))
    again = engine.grammars.compile(json_constraint(dict(reversed(PERSON.items())), "guided_json"))
    assert first is again
