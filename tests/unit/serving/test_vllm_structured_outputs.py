"""The vLLM engine's request body carries a request's constraint as vLLM's `structured_outputs`; the
constraint is checked first with the same compiler as tuneforge's engine (no vLLM runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.serving.adapters import LocalDirectorySource
from worker.serving.constraints import json_constraint, regex_constraint
from worker.serving.errors import GrammarError
from worker.serving.params import SamplingParams
from worker.serving.vllm_engine.engine import VllmEngine
from worker.serving.vllm_engine.process import VllmConfig

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture
def engine(tiny_model_dir: Path, adapter_root: Path) -> VllmEngine:
    config = VllmConfig(python=Path("/nonexistent/python"), model_path=tiny_model_dir, model_name="tiny")
    engine = VllmEngine(config, LocalDirectorySource(adapter_root))
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # what start() loads before vLLM
    engine.vocab_size, engine.eos_token_ids = len(engine.tokenizer), frozenset({2})
    return engine


def test_constraints_map_to_structured_outputs(engine: VllmEngine) -> None:
    plain = engine._body("tiny", [1, 2, 3], SamplingParams())
    assert "structured_outputs" not in plain
    schema = engine._body("tiny", [1], SamplingParams(constraint=json_constraint(SCHEMA, "response_format")))
    assert schema["structured_outputs"] == {"json": SCHEMA}
    regex = engine._body("tiny", [1], SamplingParams(constraint=regex_constraint("[0-9]+", "guided_regex")))
    assert regex["structured_outputs"] == {"regex": "[0-9]+"}
    assert {k: v for k, v in regex.items() if k != "structured_outputs"} == engine._body(
        "tiny", [1], SamplingParams()
    )


def test_a_bad_schema_is_refused_before_vllm_sees_it(engine: VllmEngine) -> None:
    with pytest.raises(GrammarError) as caught:
        engine.grammars.compile(json_constraint({"type": "strin"}, "response_format"))
    assert caught.value.field == "response_format"
