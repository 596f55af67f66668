"""Speculative decoding with Turbo heads: greedy output unchanged, token for token, in mixed batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from engine_support import Collected, hf_greedy, make_engine, run_until_done
from transformers import AutoTokenizer

from worker.serving.params import SamplingParams
from worker.serving.speculator import accept_greedy
from worker.training.loop import train
from worker.training.speculator import MedusaHeads, SpeculatorConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_support import make_config, number_rows

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def turbo_root(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`turbo/1`: a trained turbo_lora (LoRA + heads); `heads/1`: random heads on the base model alone."""
    root = tmp_path_factory.mktemp("turbo-adapters")
    config = make_config(adapter="turbo_lora", train_steps=12, speculator_heads=3)
    result = train(config, number_rows(), output_dir=root / "run", cache_dir=tiny_model_dir.parent)
    assert result.adapter_dir is not None
    (root / "turbo").mkdir()
    result.adapter_dir.rename(root / "turbo" / "1")
    torch.manual_seed(0)
    heads = MedusaHeads(SpeculatorConfig(hidden_size=64, num_heads=4))
    with torch.no_grad():
        for head in heads.heads:
            head.linear.weight.normal_(0, 2.0)  # far from identity: many drafts rejected
    (root / "heads" / "1").mkdir(parents=True)
    heads.save(root / "heads" / "1")
    for plain in (adapter_root / "acme").iterdir():
        (root / "acme").mkdir(exist_ok=True)
        (root / "acme" / plain.name).symlink_to(plain)
    return root


def test_accept_greedy_keeps_the_confirmed_prefix_and_always_one_token_more() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accept_greedy([], [3]) == [3]


def test_speculating_and_plain_requests_in_one_batch_match_greedy_decoding(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(f"Say the number {i}.")["input_ids"] for i in range(4)]
    cases = [
        ("turbo/1", prompts[0]),
        ("turbo/1", prompts[1]),
        ("heads/1", prompts[2]),
        ("acme/2", prompts[3]),
        (None, prompts[1]),
    ]
    engine = make_engine(tiny_model_dir, turbo_root)
    requests = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in cases]
    run_until_done(engine, requests)
    lora_dir = {"turbo/1": turbo_root / "turbo" / "1", "acme/2": turbo_root / "acme" / "2"}
    expected = [hf_greedy(tiny_model_dir, lora_dir.get(a or ""), p, NEW_TOKENS) for a, p in cases]
    assert [r.error for r in requests] == [None] * len(cases)
    assert [r.token_ids for r in requests] == expected
    drafted = engine.metrics.spec_drafted._value.get()
    accepted = engine.metrics.spec_accepted._value.get()
    # Both outcomes happened: some drafts were kept, some rolled back (and outputs are still exact).
    assert 0 < accepted < drafted, (accepted, drafted)
    assert engine.blocks.num_used == 0


def test_speculation_stops_exactly_at_max_tokens_and_stop_strings(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, turbo_root)
    prompt = [1, 504, 3458, 282]
    plain = Collected(engine, prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), "heads/1")
    run_until_done(engine, [plain])
    assert len(plain.token_ids) == 7
    assert plain.token_ids == hf_greedy(tiny_model_dir, None, prompt, 7)
