"""Greedy output of the batched multi-LoRA engine equals HF PEFT's, token for token, adapter by adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_support import Collected, hf_greedy, make_engine, run_until_done
from serving_support import ADAPTER_SHAPES

from worker.serving.params import SamplingParams

NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 19556, 33, 2634, 1190, 28, 253, 7016, 30, 411, 253],
    [1, 57, 1107],
    [1, 8961, 15, 6324, 327, 260, 1795, 282, 4649, 351, 77, 40, 6240, 17, 28],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
]
# Every adapter plus the base model (None); each pair gets its own prompt.
CASES = [(adapter, PROMPTS[i % len(PROMPTS)]) for i, adapter in enumerate([*ADAPTER_SHAPES, None])]


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, adapter_root: Path) -> list[list[int]]:
    return [
        hf_greedy(tiny_model_dir, adapter_root / adapter if adapter else None, prompt, NEW_TOKENS)
        for adapter, prompt in CASES
    ]


def test_one_batch_of_four_adapters_and_the_base_model_matches_peft_generate(
    tiny_model_dir: Path, adapter_root: Path, expected: list[list[int]]
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    requests = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in CASES]
    run_until_done(engine, requests)
    assert [r.error for r in requests] == [None] * len(CASES)
    assert [r.token_ids for r in requests] == expected
    assert len({tuple(e) for e in expected}) == len(expected), "adapters should change the output"


def test_requests_joining_and_leaving_mid_batch_still_match_peft_generate(
    tiny_model_dir: Path, adapter_root: Path, expected: list[list[int]]
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_batch_size=3)
    first = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in CASES[:2]]
    short = Collected(
        engine, PROMPTS[2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "acme/3"
    )
    for _ in range(5):
        engine.step()
    later = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in CASES[2:]]
    run_until_done(engine, [*first, short, *later])
    assert [r.token_ids for r in [*first, *later]] == expected
    assert len(short.token_ids) == 3
