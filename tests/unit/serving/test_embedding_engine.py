"""Embeddings in the engine loop equal HF's (PEFT's for an adapter) mean-pooled final hidden states, batched
with other requests and adapters, between generation steps that stay exactly as they were."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from embedding_support import hf_embeddings
from engine_support import Collected, make_engine, run_until_done
from family_support import build_family_model
from serving_support import make_lora_adapter

from worker.serving.embedding import EmbeddingJob, EmbeddingResult, check_inputs
from worker.serving.engine import LLMEngine
from worker.serving.errors import (
    AdapterNotFoundError,
    EngineError,
    EngineOverloadedError,
    InvalidParameterError,
    PromptTooLongError,
    ServingError,
)
from worker.serving.params import MAX_EMBEDDING_INPUTS, SamplingParams

INPUTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 19556, 33, 2634, 1190, 28, 253, 7016, 30, 411, 253],
    [1, 57],
    [1, 8961, 15, 6324, 327, 260, 1795, 282, 4649, 351, 77, 40, 6240, 17, 28],
]
ADAPTERS = [None, "acme/1", "acme/3", "acme/4"]


class Waiter:
    """An embedding job handed to the synchronous engine, and what it was delivered."""

    def __init__(
        self, engine: LLMEngine, inputs: list[list[int]], adapter: str | None, tenant: str = "t"
    ) -> None:
        self.box: queue.SimpleQueue[EmbeddingResult | ServingError] = queue.SimpleQueue()
        ref = engine.adapters.resolve(adapter, tenant) if adapter else None
        self.job = EmbeddingJob(inputs, ref, self.box.put)
        engine.embedder.check(inputs, "input")
        engine.embedder.admit(self.job)
        if ref is not None:
            assert engine.adapters.wait(ref, 60)

    def result(self) -> EmbeddingResult | ServingError:
        return self.box.get_nowait()


def run(engine: LLMEngine, waiters: list[Waiter], timeout_s: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished and time.monotonic() < deadline:
        engine.step()
    assert not engine.has_unfinished
    return [w.result() for w in waiters]


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, adapter_root: Path) -> dict[str | None, torch.Tensor]:
    return {a: hf_embeddings(tiny_model_dir, adapter_root / a if a else None, INPUTS) for a in ADAPTERS}


def test_one_pass_of_several_requests_and_adapters_matches_hf_and_peft(
    tiny_model_dir: Path, adapter_root: Path, expected: dict[str | None, torch.Tensor]
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    waiters = [Waiter(engine, INPUTS, adapter) for adapter in ADAPTERS]
    assert engine.embedder.step() == len(INPUTS) * len(ADAPTERS)  # all of them in one pass
    results = [w.result() for w in waiters]
    for adapter, result in zip(ADAPTERS, results, strict=True):
        assert isinstance(result, EmbeddingResult), result
        assert result.prompt_tokens == sum(len(t) for t in INPUTS)
        assert result.vectors.dtype == torch.float32
        torch.testing.assert_close(result.vectors, expected[adapter], atol=1e-4, rtol=0)
        torch.testing.assert_close(result.vectors.norm(dim=-1), torch.ones(len(INPUTS)))
    for adapter in ADAPTERS[1:]:
        assert (expected[adapter] - expected[None]).abs().max() > 1e-3, f"{adapter} should move the embedding"


def test_a_small_token_budget_splits_requests_over_passes_with_the_same_vectors(
    tiny_model_dir: Path, adapter_root: Path, expected: dict[str | None, torch.Tensor]
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_prefill_tokens=12)
    waiters = [Waiter(engine, INPUTS, adapter) for adapter in ("acme/1", None)]
    passes = 0
    while engine.embedder.has_unfinished:
        assert engine.embedder.step() >= 1
        passes += 1
    assert passes >= len(INPUTS)  # the 15-token input runs alone, over the budget
    for adapter, waiter in zip(("acme/1", None), waiters, strict=True):
        result = waiter.result()
        assert isinstance(result, EmbeddingResult)
        torch.testing.assert_close(result.vectors, expected[adapter], atol=1e-4, rtol=0)


def test_the_same_request_twice_gives_the_same_vectors_bit_for_bit(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    first, second = (run(engine, [Waiter(engine, INPUTS, "acme/4")])[0] for _ in range(2))
    assert isinstance(first, EmbeddingResult) and isinstance(second, EmbeddingResult)
    assert torch.equal(first.vectors, second.vectors)


def test_generation_interleaved_with_embeddings_emits_the_tokens_it_emits_alone(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone_engine = make_engine(tiny_model_dir, adapter_root)
    alone = [Collected(alone_engine, INPUTS[i], greedy, a) for i, a in enumerate(("acme/2", None))]
    run_until_done(alone_engine, alone)

    engine = make_engine(tiny_model_dir, adapter_root)
    mixed = [Collected(engine, INPUTS[i], greedy, a) for i, a in enumerate(("acme/2", None))]
    waiters = [Waiter(engine, INPUTS, a) for a in ("acme/1", None, "acme/2")]
    run_until_done(engine, mixed)
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert all(isinstance(w.result(), EmbeddingResult) for w in waiters)
    assert not engine.blocks.num_used, "embedding passes take no KV blocks"


def test_an_unloadable_adapter_fails_its_embedding_request_only(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path, expected: dict[str | None, torch.Tensor]
) -> None:
    broken = tmp_path / "bad" / "1"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')  # and no weights
    for path in adapter_root.glob("*/*"):
        (tmp_path / path.relative_to(adapter_root)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.relative_to(adapter_root)).symlink_to(path)
    engine = make_engine(tiny_model_dir, tmp_path)
    good, bad = Waiter(engine, INPUTS, "acme/1"), Waiter(engine, INPUTS, "bad/1")
    results = run(engine, [good, bad])
    assert isinstance(results[0], EmbeddingResult)
    torch.testing.assert_close(results[0].vectors, expected["acme/1"], atol=1e-4, rtol=0)
    assert isinstance(results[1], ServingError) and 400 <= results[1].status_code < 500
    with pytest.raises(AdapterNotFoundError):
        engine.adapters.resolve("nobody/9", "t")


def test_a_pass_that_raises_fails_only_the_request_that_fails_alone(
    tiny_model_dir: Path, adapter_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    poisoned = [[1, 2, 3, 4, 5, 6, 7]]
    forward = engine.runner.hidden_states

    def failing_for_poisoned(step: Any) -> torch.Tensor:
        if step.input_ids[: len(poisoned[0])].tolist() == poisoned[0]:
            raise RuntimeError("injected")
        return forward(step)

    bad, good = Waiter(engine, poisoned, None), Waiter(engine, INPUTS, "acme/1")
    monkeypatch.setattr(engine.runner, "hidden_states", failing_for_poisoned)
    results = run(engine, [bad, good])
    assert isinstance(results[0], EngineError)
    assert isinstance(results[1], EmbeddingResult)


@pytest.mark.parametrize(
    ("inputs", "error", "words"),
    [
        ([], InvalidParameterError, "at least one input"),
        ([[1, 2], []], InvalidParameterError, "input[1] is empty"),
        ([[1, 10**6]], InvalidParameterError, "token ids must be in"),
        ([[1] * 65], PromptTooLongError, "context is 64"),
        ([[1]] * (MAX_EMBEDDING_INPUTS + 1), InvalidParameterError, f"at most {MAX_EMBEDDING_INPUTS}"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(
    inputs: list[list[int]], error: type[ServingError], words: str
) -> None:
    with pytest.raises(error) as refused:
        check_inputs(inputs, vocab_size=1000, max_model_len=64, field="input")
    assert words in refused.value.message and refused.value.field == "input"
    assert 400 <= refused.value.status_code < 500


def test_a_full_queue_refuses_with_503_and_the_queued_requests_still_finish(
    tiny_model_dir: Path, adapter_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_waiting=2)
    queued = [Waiter(engine, INPUTS, None), Waiter(engine, INPUTS[:1], None)]
    with pytest.raises(EngineOverloadedError):
        engine.embedder.check(INPUTS, "input")
    monkeypatch.setattr("worker.serving.embedding.MAX_QUEUED_EMBEDDING_TOKENS", 40)
    engine.embedder.max_waiting = 10
    with pytest.raises(EngineOverloadedError) as refused:
        engine.embedder.check(INPUTS, "input")  # 34 tokens more on 40 queued
    assert refused.value.status_code == 503
    assert all(isinstance(r, EmbeddingResult) for r in run(engine, queued))
    assert engine.embedder.queued_tokens == 0
    engine.embedder.check(INPUTS, "input")  # an empty queue takes any request within the bounds


def test_a_long_embedding_request_does_not_hold_back_generation(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    """One bounded pass per step: a request of many inputs leaves every step its generation turn."""
    engine = make_engine(tiny_model_dir, adapter_root, max_prefill_tokens=16)
    many = Waiter(engine, [[1, *range(100, 109)]] * 40, "acme/1")  # 40 inputs, one pass each
    generation = Collected(
        engine, INPUTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), None
    )
    for _ in range(5):
        engine.step()
    generation.drain()
    assert generation.done and len(generation.token_ids) == 5
    assert many.job.next_input == 5 and engine.embedder.has_unfinished
    result = run(engine, [many])[0]
    assert isinstance(result, EmbeddingResult) and result.vectors.shape[0] == 40


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "phi3"])
def test_other_families_embeddings_match_hf_and_peft(
    tiny_model_dir: Path, tmp_path: Path, family: str
) -> None:
    """Sliding windows shorter than the input, soft-capped attention, scaled embeddings, q/k norms,
    fused checkpoints: the pass is the engine's own forward, so each family's details apply."""
    model_dir = build_family_model(family, tiny_model_dir, tmp_path / family, seed=3)
    targets = (
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else ["q_proj", "v_proj"]
    )
    make_lora_adapter(model_dir, tmp_path / "fam" / "1", seed=4, r=4, lora_alpha=8, target_modules=targets)
    engine = make_engine(model_dir, tmp_path)
    waiters = [Waiter(engine, INPUTS, None), Waiter(engine, INPUTS, "fam/1")]
    results = run(engine, waiters)
    for result, adapter in zip(results, (None, tmp_path / "fam" / "1"), strict=True):
        assert isinstance(result, EmbeddingResult), result
        torch.testing.assert_close(
            result.vectors, hf_embeddings(model_dir, adapter, INPUTS), atol=1e-4, rtol=0
        )
