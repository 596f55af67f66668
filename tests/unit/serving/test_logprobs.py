"""Logprobs the engine reports match HF's log_softmax of the logits (with PEFT for a LoRA): each generated
token's own and its alternatives, the scored prompt, with speculation and after preemption."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import Collected, hf_log_probs, make_engine, run_until_done, step
from safetensors.torch import load_file, save_file
from serving_support import make_random_eagle, make_random_heads
from transformers import AutoTokenizer

from worker.serving.errors import InvalidParameterError
from worker.serving.kv_cache import BLOCK_SIZE, CacheShape
from worker.serving.logprobs import non_finite
from worker.serving.logprobs_format import TokenTexts
from worker.serving.outputs import PromptLogprobs, TokenOutput
from worker.serving.params import MAX_LOGPROBS, SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 57, 1107]
TOLERANCE = 1e-4


def check_generated(outputs: list[TokenOutput], reference: torch.Tensor, prompt_len: int, k: int) -> None:
    """Each token's logprob and its k alternatives equal the reference's at its position."""
    for j, output in enumerate(outputs):
        row = reference[prompt_len - 1 + j]
        assert abs(output.logprob - float(row[output.token_id])) < TOLERANCE
        assert len(output.top_logprobs) == k
        values = [logprob for _, logprob in output.top_logprobs]
        torch.testing.assert_close(torch.tensor(values), row.topk(k).values, atol=TOLERANCE, rtol=0)
        for token, logprob in output.top_logprobs:
            assert abs(logprob - float(row[token])) < TOLERANCE


def check_prompt(output: TokenOutput, reference: torch.Tensor, prompt: list[int], k: int) -> None:
    scored = output.prompt_logprobs
    assert scored is not None
    assert scored.token_ids == tuple(prompt)
    assert scored.logprobs[0] is None and scored.top[0] == ()
    expected = [float(reference[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    torch.testing.assert_close(
        torch.tensor(scored.logprobs[1:]), torch.tensor(expected), atol=TOLERANCE, rtol=0
    )
    for p in range(1, len(prompt)):
        assert [t for t, _ in scored.top[p]] == reference[p - 1].topk(k).indices.tolist()


@pytest.mark.parametrize("adapter", [None, "acme/1"])
def test_generated_and_prompt_logprobs_match_hf(
    tiny_model_dir: Path, adapter_root: Path, adapter: str | None
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    asks = [
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
        SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True, logprobs=MAX_LOGPROBS),
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),  # asks for nothing
    ]
    requests = [Collected(engine, PROMPT[: 5 + i], params, adapter) for i, params in enumerate(asks)]
    run_until_done(engine, requests)
    adapter_dir = adapter_root / adapter if adapter else None
    for request, params in zip(requests, asks, strict=True):
        prompt = request.request.seq.prompt_token_ids
        reference = hf_log_probs(tiny_model_dir, adapter_dir, prompt + request.token_ids)
        check_generated(request.outputs, reference, len(prompt), params.logprobs)
        if params.prompt_logprobs is not None:
            check_prompt(request.outputs[0], reference, prompt, params.prompt_logprobs)
            assert all(o.prompt_logprobs is None for o in request.outputs[1:])
        else:
            assert all(o.prompt_logprobs is None for o in request.outputs)


@pytest.fixture(scope="module")
def speculator_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`heads/1`: random Medusa heads (most drafts rejected); `echo/1`: an eagle layer whose output is its
    input (it drafts the last token again, which tiny-random-llama repeats: drafts accepted); `sharp/1`:
    the same with 3x sharper logits (a q unlike p, for rejection sampling)."""
    root = tmp_path_factory.mktemp("logprob-speculators")
    make_random_heads(root / "heads" / "1", hidden_size=64, num_heads=3)
    echo = make_random_eagle(root / "echo" / "1", tiny_model_dir, depth=3, seed=3)
    state = load_file(echo / "speculator.safetensors")
    for name, weight in state.items():
        if name.endswith("proj.weight"):
            state[name] = torch.zeros_like(weight)
    state["fc.weight"] = torch.cat([torch.eye(64), torch.zeros(64, 64)], 1)
    save_file(state, str(echo / "speculator.safetensors"))
    sharp = root / "sharp" / "1"
    shutil.copytree(echo, sharp)
    state["fc.weight"] = 3 * state["fc.weight"]
    save_file(state, str(sharp / "speculator.safetensors"))
    return root


@pytest.mark.parametrize(("adapter", "temperature"), [("heads/1", 0.0), ("echo/1", 0.0), ("sharp/1", 0.8)])
def test_speculated_tokens_carry_the_verification_logprobs(
    tiny_model_dir: Path, speculator_root: Path, adapter: str, temperature: float
) -> None:
    """A speculating request emits several tokens a step; each one's numbers are the target model's."""
    engine = make_engine(tiny_model_dir, speculator_root)
    params = SamplingParams(
        max_tokens=12, temperature=temperature, seed=7, ignore_eos=True, logprobs=4, prompt_logprobs=2
    )
    prompt = [1, 504, 3458, 282]  # tiny-random-llama repeats 282 after it: the echo drafts are right
    request = Collected(engine, prompt, params, adapter)
    run_until_done(engine, [request])
    stats = request.outputs[-1].speculation
    assert stats is not None and stats.steps > 0
    if adapter == "echo/1":
        assert stats.accepted > 0  # several tokens a step
    reference = hf_log_probs(tiny_model_dir, None, prompt + request.token_ids)
    check_generated(request.outputs, reference, len(prompt), 4)
    check_prompt(request.outputs[0], reference, prompt, 2)


def test_a_preempted_request_scores_its_prompt_once(tiny_model_dir: Path, adapter_root: Path) -> None:
    # 8 blocks for six sequences of 43..48 tokens (3 blocks each): some are preempted and prefilled again.
    budget = CacheShape(2, 2, 16, torch.float32).bytes_per_token * 8 * BLOCK_SIZE
    engine = make_engine(tiny_model_dir, adapter_root, kv_cache_bytes=budget, max_model_len=64)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    requests = [Collected(engine, PROMPT[: 3 + i], params, None) for i in range(6)]
    preempted: list[int] = []
    preempt = engine.scheduler._preempt

    def counting_preempt(seq: Any) -> None:
        preempted.append(seq.seq_id)
        preempt(seq)

    engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    deadline = time.monotonic() + 60
    while not all(r.done for r in requests) and time.monotonic() < deadline:
        step(engine)
        for r in requests:
            r.drain()
    assert preempted
    for request in requests:
        assert request.error is None
        prompt = request.request.seq.prompt_token_ids
        assert sum(o.prompt_logprobs is not None for o in request.outputs) == 1
        reference = hf_log_probs(tiny_model_dir, None, prompt + request.token_ids)
        check_prompt(request.outputs[0], reference, prompt, 1)
        check_generated(request.outputs, reference, len(prompt), 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", MAX_LOGPROBS + 1), ("logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1)],
)
def test_out_of_bounds_counts_are_refused_naming_the_field(field: str, value: int) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert refused.value.field == field


def test_a_scored_prompt_with_a_non_finite_logprob_is_named() -> None:
    """A step pins such a prompt on its adapter (stepping.py raises BadRows), as it does non-finite logits."""
    finite = PromptLogprobs((1, 2), (None, -1.0), ((), ()))
    broken = PromptLogprobs((1, 2, 3), (None, -1.0, float("nan")), ((), (), ()))
    assert non_finite([finite, None, broken]) == [2]


def test_token_strings_and_offsets_follow_the_text_through_multibyte_characters(tiny_model_dir: Path) -> None:
    """Offsets index the decoded text even where a character spans several tokens (those before the last
    add nothing), so a streamed or echoed reply's text_offset stays right past them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["Hello world, café — naïve 日本語 🙂 end", "  two  spaces\nnewline"]:
        ids = tokenizer(text)["input_ids"]
        texts, offset, placed = TokenTexts(tokenizer, []), 0, []
        for token in ids:
            placed.append((texts.string(token), offset))
            offset += texts.advance(token)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert offset == len(decoded)
        whole = [(s, at) for s, at in placed if "\ufffd" not in s]
        assert len(whole) >= len(ids) - 6
        assert all(decoded[at : at + len(s)] == s for s, at in whole)
