"""Chunked prefill: a prompt longer than the step's token budget is prefilled over several steps that
also decode the running streams; greedy output stays HF/PEFT's."""

from __future__ import annotations

import random
from pathlib import Path

from engine_support import (
    Collected,
    hf_greedy,
    hf_log_probs,
    make_engine,
    run_until_done,
    step,
    wait_for_adapters,
)

from worker.serving.params import SamplingParams

_rng = random.Random(11)
LONG = [1, *(_rng.randrange(3, 1000) for _ in range(69))]  # 70 tokens: 5 chunks of at most 16
SHORT = [[1, *(_rng.randrange(3, 1000) for _ in range(4 + i))] for i in range(2)]
BUDGET = 16


def test_a_long_prompt_joins_in_chunks_while_running_streams_keep_decoding(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_prefill_tokens=BUDGET, enable_prefix_caching=False)
    streams = [
        Collected(engine, SHORT[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), None),
        Collected(engine, SHORT[1], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), "acme/1"),
    ]
    while not all(s.request.seq.output_token_ids for s in streams):
        step(engine)
    long = Collected(engine, LONG, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "acme/2")
    wait_for_adapters(engine, [long])
    chunked_steps = 0
    while not long.request.seq.output_token_ids:
        before = [len(s.request.seq.output_token_ids) for s in streams]
        cached_before = long.request.seq.num_cached
        step(engine)
        chunked_steps += 1
        after = [len(s.request.seq.output_token_ids) for s in streams]
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1], "a running stream stalled"
        if not long.request.seq.output_token_ids:  # a chunk within what the streams' tokens left
            assert 0 < long.request.seq.num_cached - cached_before <= BUDGET - len(streams)
    # 70 prompt tokens, 14 a step next to the two streams' tokens: at least 5 steps.
    assert chunked_steps >= 5
    run_until_done(engine, [*streams, long])
    assert streams[0].token_ids == hf_greedy(tiny_model_dir, None, SHORT[0], 16)
    assert streams[1].token_ids == hf_greedy(tiny_model_dir, adapter_root / "acme/1", SHORT[1], 16)
    assert long.token_ids == hf_greedy(tiny_model_dir, adapter_root / "acme/2", LONG, 5)


def test_chunks_after_a_cached_prefix_and_several_long_prompts_match_hf(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_prefill_tokens=BUDGET, max_batch_size=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [LONG, LONG[:40] + SHORT[0], LONG[:50] + SHORT[1], SHORT[0]]
    requests = [Collected(engine, p, params, None) for p in prompts]
    run_until_done(engine, requests)
    assert [r.token_ids for r in requests] == [hf_greedy(tiny_model_dir, None, p, 6) for p in prompts]


def test_a_request_asking_prompt_logprobs_is_prefilled_whole_and_scored_like_hf(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_prefill_tokens=BUDGET)
    other = Collected(engine, SHORT[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), None)
    step(engine)
    scored = Collected(
        engine, LONG, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=0), None
    )
    run_until_done(engine, [other, scored])
    prompt = scored.outputs[0].prompt_logprobs
    assert prompt is not None and len(prompt.logprobs) == len(LONG)
    reference = hf_log_probs(tiny_model_dir, None, LONG)
    for position in range(1, len(LONG)):
        expected = float(reference[position - 1, LONG[position]])
        got = prompt.logprobs[position]
        assert got is not None and abs(got - expected) < 1e-4
    assert scored.token_ids == hf_greedy(tiny_model_dir, None, LONG, 2)
