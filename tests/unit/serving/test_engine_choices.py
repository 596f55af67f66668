"""n choices from one prefill, and penalties / logit_bias in the engine against HF's logits by hand."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import Collected, make_engine, run_until_done, step, wait_for_adapters
from serving_support import make_random_heads
from transformers import AutoModelForCausalLM

from worker.serving.engine import LLMEngine
from worker.serving.errors import InvalidParameterError, TooManyChoicesError
from worker.serving.kv_cache import BLOCK_SIZE, CacheShape
from worker.serving.outputs import FinishReason
from worker.serving.params import SamplingParams

# 20 tokens: one full KV block and a partial one, which each fork copies.
PROMPT = [
    1,
    504,
    3458,
    282,
    4649,
    314,
    57,
    1107,
    29871,
    13,
    450,
    1234,
    338,
    263,
    4086,
    310,
    29889,
    306,
    626,
    5,
]


# tiny-random-llama: 2 layers, 2 KV heads of 16 dims, fp32: 8 blocks of 16 tokens.
SMALL_CACHE_8_BLOCKS = CacheShape(2, 2, 16, torch.float32).bytes_per_token * 8 * BLOCK_SIZE


def choices(collected: Collected, n: int) -> list[list[int]]:
    by_choice: list[list[int]] = [[] for _ in range(n)]
    for output in collected.outputs:
        by_choice[output.choice].append(output.token_id)
    return by_choice


def prompt_tokens_computed(engine: LLMEngine) -> float:
    return float(engine.metrics.prompt_tokens._value.get())


def run_alone(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, adapter: str | None = None
) -> Collected:
    collected = Collected(engine, prompt, params, adapter)
    run_until_done(engine, [collected])
    assert collected.error is None
    return collected


def test_n_choices_share_one_prefill_and_each_is_what_its_seed_gives_alone(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True, n=4)
    before = prompt_tokens_computed(engine)
    forked = run_alone(engine, PROMPT, params)
    assert prompt_tokens_computed(engine) - before == len(PROMPT)  # one prefill for the four choices
    got = choices(forked, 4)
    assert all(len(tokens) == 12 for tokens in got)
    assert len({tuple(tokens) for tokens in got}) == 4  # distinct
    assert sum(o.finished for o in forked.outputs) == 4
    assert engine.blocks.num_used == 0  # shared and copied blocks all came back

    # Choice j is exactly the request alone with seed + j (the shared KV blocks hold the same prompt).
    for j in range(4):
        alone = run_alone(
            engine, PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=1234 + j, ignore_eos=True)
        )
        assert alone.token_ids == got[j], j
    again = run_alone(engine, PROMPT, params)
    assert choices(again, 4) == got  # reproducible


def test_forks_run_beside_other_requests_and_stop_on_their_own(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    other = Collected(
        engine, PROMPT[:5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "acme/1"
    )
    forked = Collected(
        engine, PROMPT[:16], SamplingParams(max_tokens=9, temperature=0.8, seed=3, n=3), "acme/2"
    )
    wait_for_adapters(engine, [other, forked])
    for _ in range(10):  # the parent is prefilled (and forked) within a step or two
        if len(engine._families.get(forked.request.seq.seq_id, [])) == 3:
            break
        step(engine)
    key = forked.request.seq.adapter_key
    assert key is not None and engine.adapters._pins[key] == 3  # each running choice pins the adapter
    run_until_done(engine, [other, forked])
    assert other.error is None and forked.error is None
    assert len(other.token_ids) == 6
    assert sorted(o.choice for o in forked.outputs if o.finished) == [0, 1, 2]
    assert engine.blocks.num_used == 0
    assert engine.adapters._pins == {}  # every choice pinned its adapter and let go of it
    alone = run_alone(
        engine, PROMPT[:5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "acme/1"
    )
    assert alone.token_ids == other.token_ids


def test_aborting_a_request_aborts_every_choice_and_frees_their_blocks(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    forked = Collected(engine, PROMPT, SamplingParams(max_tokens=50, seed=5, ignore_eos=True, n=3), None)
    for _ in range(3):
        step(engine)
    forked.drain()
    assert {o.choice for o in forked.outputs} == {0, 1, 2}
    engine.abort(forked.request.seq.seq_id)
    forked.drain()
    aborted = [o for o in forked.outputs if o.finish_reason is FinishReason.ABORTED]
    assert sorted(o.choice for o in aborted) == [0, 1, 2]
    assert not engine.has_unfinished and engine.blocks.num_used == 0


def test_a_request_whose_choices_could_fill_the_cache_or_the_batch_is_refused_naming_n(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, kv_cache_bytes=2 << 20, max_batch_size=64)
    blocks = engine.blocks.num_blocks
    per_choice = engine.blocks.blocks_needed(len(PROMPT) + 100)
    fits = blocks // 2 // per_choice
    assert 1 < fits < 32  # the cache, not the batch, is what limits n here
    engine.validate(PROMPT, SamplingParams(max_tokens=100, n=fits))
    with pytest.raises(TooManyChoicesError) as too_many:
        engine.validate(PROMPT, SamplingParams(max_tokens=100, n=fits + 1))
    assert too_many.value.field == "n" and too_many.value.status_code == 400
    assert "KV-cache blocks" in too_many.value.message
    narrow = make_engine(tiny_model_dir, adapter_root, max_batch_size=8)
    narrow.validate(PROMPT, SamplingParams(max_tokens=4, n=4))
    with pytest.raises(TooManyChoicesError, match="batch slots") as too_many:
        narrow.validate(PROMPT, SamplingParams(max_tokens=4, n=5))
    assert too_many.value.field == "n"
    with pytest.raises(InvalidParameterError) as caught:
        engine.validate(PROMPT, SamplingParams(logit_bias=((engine.runner.vocab_size, 1.0),)))
    assert caught.value.field == "logit_bias"


def hf_shaped_greedy(model_dir: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding on HF's logits with logit_bias and OpenAI's penalties applied by hand."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([prompt + generated])).logits[0, -1].float()
            for token, bias in params.logit_bias:
                logits[token] += bias
            for token, count in Counter(generated).items():
                logits[token] -= params.frequency_penalty * count + params.presence_penalty
            generated.append(int(logits.argmax()))
    return generated


@pytest.mark.parametrize(
    "shaping",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5, "presence_penalty": -0.5},
        {"logit_bias": ((306, 100.0),)},
        {"logit_bias": ((450, 4.0), (1234, -100.0)), "frequency_penalty": 2.0},
    ],
)
def test_penalised_greedy_decoding_matches_hf_logits_shaped_by_hand(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path, shaping: dict[str, Any]
) -> None:
    make_random_heads(tmp_path / "heads" / "1", hidden_size=64, num_heads=4)
    engine = make_engine(tiny_model_dir, tmp_path)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **shaping)
    expected = hf_shaped_greedy(tiny_model_dir, PROMPT[:8], params)
    plain = run_alone(engine, PROMPT[:8], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert plain.token_ids != expected  # the shaping changed the output
    assert run_alone(engine, PROMPT[:8], params).token_ids == expected
    # On an adapter with a speculator (random heads on the base model) the request does not speculate:
    # each token is the shaped distribution's, with the history of the tokens accepted before it.
    unshaped = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert run_alone(engine, PROMPT[:8], unshaped, "heads/1").outputs[-1].speculation is not None
    speculated = run_alone(engine, PROMPT[:8], params, "heads/1")
    assert speculated.token_ids == expected
    assert speculated.outputs[-1].speculation is None


def test_a_tight_cache_preempts_forks_and_recomputes_them_exactly(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    def run(engine: LLMEngine) -> tuple[list[list[list[int]]], int]:
        requests = [
            Collected(
                engine, PROMPT[: 6 + i], SamplingParams(max_tokens=20, seed=i, ignore_eos=True, n=2), None
            )
            for i in range(4)
        ]
        peak = 0
        for _ in range(500):
            if all(r.done for r in requests):
                break
            step(engine)
            peak = max(peak, engine.blocks.num_used)
            for r in requests:
                r.drain()
        assert all(r.error is None for r in requests)
        return [choices(r, 2) for r in requests], peak

    roomy, _ = run(make_engine(tiny_model_dir, adapter_root))
    tight_engine = make_engine(
        tiny_model_dir, adapter_root, kv_cache_bytes=SMALL_CACHE_8_BLOCKS, max_model_len=64
    )
    assert tight_engine.blocks.num_blocks == 8
    before = prompt_tokens_computed(tight_engine)
    tight, peak = run(tight_engine)
    assert tight == roomy
    assert peak <= 8 and tight_engine.blocks.num_used == 0
    assert prompt_tokens_computed(tight_engine) - before > sum(6 + i for i in range(4))  # some recomputed
