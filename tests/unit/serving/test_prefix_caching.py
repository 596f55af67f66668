"""Prefix caching: a prompt's cached full blocks (same tokens, same adapter) are reused and only the
rest is prefilled; greedy output stays HF/PEFT's; adapters never share KV; a small cache evicts."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
from engine_support import Collected, hf_greedy, make_engine, run_until_done, step

from worker.serving.engine import LLMEngine
from worker.serving.kv_cache import BLOCK_SIZE, BlockManager, CacheShape
from worker.serving.params import SamplingParams
from worker.serving.sequence import Sequence

NEW_TOKENS = 6
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
_rng = random.Random(7)
SYSTEM = [1, *(_rng.randrange(3, 1000) for _ in range(3 * BLOCK_SIZE + 4))]  # 3 full blocks and 5 more
QUESTIONS = [[_rng.randrange(3, 1000) for _ in range(5 + 3 * i)] for i in range(4)]


def _count(engine: LLMEngine, name: str) -> float:
    value = engine.metrics.registry.get_sample_value(name)
    return value or 0.0


def _run(engine: LLMEngine, prompts: list[list[int]], adapter: str | None = None) -> list[list[int]]:
    requests = [Collected(engine, prompt, GREEDY, adapter) for prompt in prompts]
    run_until_done(engine, requests)
    assert [r.error for r in requests] == [None] * len(prompts)
    return [r.token_ids for r in requests]


def test_a_cached_system_prompt_prefills_only_the_rest_and_matches_hf(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    first, second = SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[1]
    assert _run(engine, [first]) == [hf_greedy(tiny_model_dir, None, first, NEW_TOKENS)]
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 0
    prefilled = _count(engine, "tuneforge_serving_prompt_tokens_total")
    assert prefilled == len(first)
    assert _count(engine, "tuneforge_serving_prefix_cache_blocks") >= 3

    assert _run(engine, [second]) == [hf_greedy(tiny_model_dir, None, second, NEW_TOKENS)]
    cached = 3 * BLOCK_SIZE  # the system prompt's full blocks; its last 5 tokens share a partial block
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == cached
    assert _count(engine, "tuneforge_serving_prefix_cache_queries_total") == len(first) + len(second)
    assert _count(engine, "tuneforge_serving_prompt_tokens_total") - prefilled == len(second) - cached


def test_the_same_prompt_again_computes_at_least_its_last_token(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    prompt = SYSTEM[: 2 * BLOCK_SIZE]  # exactly two full blocks: the second is recomputed for its logits
    expected = [hf_greedy(tiny_model_dir, None, prompt, NEW_TOKENS)]
    assert _run(engine, [prompt]) == expected
    assert _run(engine, [prompt]) == expected
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == BLOCK_SIZE


def test_a_cached_prefix_of_one_adapter_never_serves_another(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    prompt = SYSTEM + QUESTIONS[2]
    _run(engine, [prompt])  # the base model's blocks
    got_a = _run(engine, [prompt], "acme/1")
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 0
    got_b = _run(engine, [prompt], "acme/2")
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 0
    again_a = _run(engine, [prompt], "acme/1")
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 3 * BLOCK_SIZE
    expected_a = hf_greedy(tiny_model_dir, adapter_root / "acme/1", prompt, NEW_TOKENS)
    expected_b = hf_greedy(tiny_model_dir, adapter_root / "acme/2", prompt, NEW_TOKENS)
    assert got_a == again_a == [expected_a]
    assert got_b == [expected_b]
    assert expected_a != expected_b


def test_mixed_batches_joining_and_leaving_with_shared_prefixes_match_hf(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_batch_size=3)
    prompts = [SYSTEM + q for q in QUESTIONS]
    cases = [(prompts[0], None), (prompts[1], "acme/1"), (prompts[2], None), (prompts[3], "acme/1")]
    first = [Collected(engine, p, GREEDY, a) for p, a in cases[:2]]
    for _ in range(3):
        step(engine)
    later = [Collected(engine, p, GREEDY, a) for p, a in cases[2:]]
    run_until_done(engine, [*first, *later])
    expected = [hf_greedy(tiny_model_dir, adapter_root / a if a else None, p, NEW_TOKENS) for p, a in cases]
    assert [r.token_ids for r in [*first, *later]] == expected
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 2 * 3 * BLOCK_SIZE


def _budget_for_tokens(tokens: int) -> int:
    # tiny-random-llama: 2 layers, 2 KV heads of 16 dims, fp32.
    return CacheShape(2, 2, 16, __import__("torch").float32).bytes_per_token * tokens


@pytest.mark.parametrize("step_tokens", [4096, 8])  # 8: prompts are prefilled (and recomputed) in chunks
def test_a_small_cache_evicts_and_preempted_sequences_recompute_exactly(
    tiny_model_dir: Path, adapter_root: Path, step_tokens: int
) -> None:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [SYSTEM[:20] + q for q in QUESTIONS] * 2
    roomy = make_engine(tiny_model_dir, adapter_root, enable_prefix_caching=False)
    reference = [Collected(roomy, p, params, None) for p in prompts]
    run_until_done(roomy, reference)

    tight = make_engine(
        tiny_model_dir,
        adapter_root,
        kv_cache_bytes=_budget_for_tokens(8 * BLOCK_SIZE),
        max_model_len=64,
        max_prefill_tokens=step_tokens,
    )
    requests = [Collected(tight, p, params, None) for p in prompts]
    deadline = time.monotonic() + 60
    while not all(r.done for r in requests) and time.monotonic() < deadline:
        step(tight)
        assert tight.blocks.num_used <= 8
        for r in requests:
            r.drain()
    assert [r.token_ids for r in requests] == [r.token_ids for r in reference]
    assert _count(tight, "tuneforge_serving_prefix_cache_hits_total") > 0
    assert tight.blocks.num_used == 0
    assert tight.blocks.num_free == 8


def test_block_manager_evicts_the_least_recently_freed_cached_block() -> None:
    blocks = BlockManager(4, prefix_caching=True)
    seqs = [Sequence([i] * BLOCK_SIZE + [99], GREEDY) for i in range(2)]
    for seq in seqs:
        blocks.allocate(seq, reuse=True)
        blocks.register(seq, len(seq))
    assert blocks.num_cached_blocks == 2
    cached_first, cached_second = seqs[0].block_table[0], seqs[1].block_table[0]
    for seq in seqs:
        blocks.free(seq)
    assert blocks.num_free == 4 and blocks.num_cached_blocks == 2
    again = Sequence([0] * BLOCK_SIZE + [5, 6], GREEDY)
    assert blocks.can_allocate(again, reserve=2, reuse=True)
    blocks.allocate(again, reuse=True)
    assert again.block_table[0] == cached_first and again.num_cached == BLOCK_SIZE
    # Two more blocks: the never-used one left, then the cached block without a holder.
    other = Sequence(list(range(200, 200 + BLOCK_SIZE + 1)), GREEDY)
    assert not blocks.can_allocate(other, reserve=1, reuse=True)
    assert blocks.can_allocate(other, reuse=True)
    blocks.allocate(other, reuse=True)
    assert cached_second in other.block_table
    assert blocks.num_cached_blocks == 1
    assert blocks.num_free == 0


def test_a_prefix_one_tenant_cached_is_never_reused_for_another(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    """A cache hit shows in the time to first token: sharing the base model's cached prompts across
    tenants would tell one tenant what another sent. Within a tenant they are shared."""
    engine = make_engine(tiny_model_dir, adapter_root)
    prompt = SYSTEM + QUESTIONS[0]

    def run(tenant: str) -> list[int]:
        request = Collected(engine, prompt, replace(GREEDY, cache_scope=tenant), None)
        run_until_done(engine, [request])
        assert request.error is None
        return request.token_ids

    expected = hf_greedy(tiny_model_dir, None, prompt, NEW_TOKENS)
    assert run("alice") == expected
    assert run("mallory") == expected
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 0
    assert run("alice") == expected
    assert _count(engine, "tuneforge_serving_prefix_cache_hits_total") == 3 * BLOCK_SIZE


def test_block_keys_separate_adapter_and_scope_and_chain_over_earlier_blocks() -> None:
    from worker.serving.kv_cache import _block_key

    tokens = list(range(BLOCK_SIZE))
    base = _block_key(None, tokens, None, "alice")
    assert base == _block_key(None, list(tokens), None, "alice")
    others = [
        _block_key(None, tokens, None, "mallory"),
        _block_key(None, tokens, "alice", None),  # the same text in another field is another key
        _block_key(None, tokens, "al", "ice"),
        _block_key(b"x" * 16, tokens, None, "alice"),
        _block_key(None, [*tokens[:-1], 99], None, "alice"),
    ]
    assert base not in others and len(set(others)) == len(others)
