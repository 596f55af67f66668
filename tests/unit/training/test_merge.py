"""worker.training.merge: a stored artifact made a standard HF model directory that generates as the
artifact does (a LoRA or DoRA merged into its base; a whole model taken as it is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from tuneforge.rules.artifacts import SPECULATOR_CONFIG, SPECULATOR_WEIGHTS, TRAINING_SUMMARY
from version_artifacts import peft_adapter

from worker.training.merge import MergeError, is_whole_model, model_directory

TINY = "tiny-random-llama"
PROMPT = "The quick brown fox"
NEW_TOKENS = 10


def _base(tiny_cache: Path) -> Path:
    return tiny_cache / TINY


def _greedy(model: torch.nn.Module, tokenizer_dir: Path) -> list[int]:
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def _adapter(base_dir: Path, out: Path, *, dora: bool) -> Path:
    peft_adapter(base_dir, out, dora=dora)
    (out / TRAINING_SUMMARY).write_text("{}")  # what a published artifact also holds
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_merged_adapter_reloads_as_a_plain_model_that_generates_as_the_adapter_does(
    tiny_cache: Path, tmp_path: Path, dora: bool
) -> None:
    base_dir = _base(tiny_cache)
    artifact = _adapter(base_dir, tmp_path / "artifact", dora=dora)
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), artifact
    )
    base_tokens = _greedy(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), base_dir)

    merged_dir = model_directory(base_dir, artifact, tmp_path / "merged")

    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", TRAINING_SUMMARY}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not isinstance(merged, PeftModel)
    expected = _greedy(adapter, base_dir)
    assert expected != base_tokens, "the adapter must change the greedy output for this test to mean anything"
    assert _greedy(merged, merged_dir) == expected
    ids = torch.tensor([[1, 42, 7, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_whole_model_is_taken_as_it_is_without_its_summary_or_heads(
    tiny_cache: Path, tmp_path: Path
) -> None:
    base_dir = _base(tiny_cache)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    artifact = tmp_path / "full"
    model.save_pretrained(artifact, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(artifact)
    for name in (TRAINING_SUMMARY, SPECULATOR_CONFIG, SPECULATOR_WEIGHTS):
        (artifact / name).write_text("{}")
    assert is_whole_model(artifact)

    out = model_directory(base_dir, artifact, tmp_path / "out")

    assert not {p.name for p in out.iterdir()} & {TRAINING_SUMMARY, SPECULATOR_CONFIG, SPECULATOR_WEIGHTS}
    assert _greedy(AutoModelForCausalLM.from_pretrained(out), out) == _greedy(model, base_dir)


def test_speculator_heads_alone_are_refused_naming_what_is_missing(tiny_cache: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "turbo"
    artifact.mkdir()
    (artifact / SPECULATOR_CONFIG).write_text(json.dumps({"kind": "medusa"}))
    (artifact / SPECULATOR_WEIGHTS).write_bytes(b"")
    with pytest.raises(MergeError, match="neither a PEFT adapter"):
        model_directory(_base(tiny_cache), artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists()
