"""The engine's scheduling promises: memory budget respected, preemption recomputes exactly, requests
fail alone, aborts free their blocks, adapters load without stalling the batch and stay LRU-bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from engine_support import Collected, make_engine, run_until_done, step, wait_for_adapters

from worker.serving.adapters import LocalDirectorySource, ResolvedAdapter
from worker.serving.errors import AdapterLoadError, AdapterNotFoundError, PromptTooLongError
from worker.serving.kv_cache import BLOCK_SIZE, CacheShape
from worker.serving.outputs import FinishReason
from worker.serving.params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPT = [1, 504, 3458, 282, 4649, 314, 57, 1107]


def _budget_for_tokens(engine_tokens: int) -> int:
    # tiny-random-llama: 2 layers, 2 KV heads of 16 dims, fp32.
    return CacheShape(2, 2, 16, __import__("torch").float32).bytes_per_token * engine_tokens


def test_a_tight_kv_budget_queues_and_preempts_instead_of_crashing_and_outputs_stay_exact(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    roomy = make_engine(tiny_model_dir, adapter_root)
    reference = [Collected(roomy, PROMPT[: 3 + i], GREEDY, f"acme/{i % 4 + 1}") for i in range(6)]
    run_until_done(roomy, reference)

    # 8 blocks = 128 tokens for six 23..28-token sequences: they cannot all run at once.
    tight = make_engine(
        tiny_model_dir, adapter_root, kv_cache_bytes=_budget_for_tokens(8 * BLOCK_SIZE), max_model_len=64
    )
    assert tight.blocks.num_blocks == 8
    requests = [Collected(tight, PROMPT[: 3 + i], GREEDY, f"acme/{i % 4 + 1}") for i in range(6)]
    peak = 0
    deadline = time.monotonic() + 60
    while not all(r.done for r in requests) and time.monotonic() < deadline:
        step(tight)
        peak = max(peak, tight.blocks.num_used)
        for r in requests:
            r.drain()
    assert [r.token_ids for r in requests] == [r.token_ids for r in reference]
    assert peak <= 8
    assert tight.blocks.num_used == 0


def test_budget_smaller_than_one_context_is_refused_at_start(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    with pytest.raises(ValueError, match="kv-cache-bytes"):
        make_engine(
            tiny_model_dir, adapter_root, kv_cache_bytes=_budget_for_tokens(BLOCK_SIZE), max_model_len=64
        )


def test_unknown_and_broken_adapters_fail_alone_while_the_batch_completes(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "adapters"
    (broken / "bad" / "1").mkdir(parents=True)
    (broken / "bad" / "1" / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_alpha": 8}')
    (broken / "bad" / "1" / "adapter_model.bin").write_bytes(b"pickle")
    for src in (adapter_root / "acme").iterdir():
        (broken / "acme").mkdir(exist_ok=True)
        (broken / "acme" / src.name).symlink_to(src)
    engine = make_engine(tiny_model_dir, broken)
    good = [Collected(engine, PROMPT, GREEDY, "acme/1"), Collected(engine, PROMPT, GREEDY, None)]
    with pytest.raises(AdapterNotFoundError):  # resolved before the request is queued
        Collected(engine, PROMPT, GREEDY, "nope/7")
    pickle_only = Collected(engine, PROMPT, GREEDY, "bad/1")
    run_until_done(engine, [*good, pickle_only])
    assert isinstance(pickle_only.error, AdapterLoadError)
    assert "safetensors" in pickle_only.error.message
    assert [len(r.token_ids) for r in good] == [20, 20]


def test_prompt_longer_than_the_context_is_refused_naming_the_limit(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="context is 64 tokens"):
        engine.add_request(list(range(1, 70)), GREEDY)
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=60))


def test_abort_frees_the_sequence_blocks_at_once(tiny_model_dir: Path, adapter_root: Path) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    keep, drop = Collected(engine, PROMPT, GREEDY, None), Collected(engine, PROMPT, GREEDY, "acme/2")
    # The adapter loads on a thread of its own: wait for it, then step until its request holds cache
    # blocks (a fixed number of steps raced the load on a busy machine, and the abort then had nothing
    # to free).
    wait_for_adapters(engine, [drop])
    deadline = time.monotonic() + 60
    while not drop.request.seq.block_table and time.monotonic() < deadline:
        engine.step()
    engine.step()
    used = engine.blocks.num_used
    engine.abort(drop.request.seq.seq_id)
    drop.drain()
    assert drop.outputs[-1].finish_reason is FinishReason.ABORTED
    assert engine.blocks.num_used < used
    run_until_done(engine, [keep])
    assert len(keep.token_ids) == 20 and engine.blocks.num_used == 0


def test_stop_string_eos_and_max_tokens_end_requests_with_their_reason(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    free = Collected(engine, PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), None)
    run_until_done(engine, [free])
    text = "".join(o.text for o in free.outputs)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    stopped = Collected(
        engine, PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)), None
    )
    run_until_done(engine, [stopped])
    stopped_text = "".join(o.text for o in stopped.outputs)
    assert stopped.outputs[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped_text == text[: text.index(stop)]
    assert free.outputs[-1].finish_reason is FinishReason.LENGTH


def test_same_seed_same_sample_whatever_the_batch(tiny_model_dir: Path, adapter_root: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone_engine = make_engine(tiny_model_dir, adapter_root)
    alone = Collected(alone_engine, PROMPT, params, "acme/4")
    run_until_done(alone_engine, [alone])
    crowded_engine = make_engine(tiny_model_dir, adapter_root)
    noise = [
        Collected(crowded_engine, PROMPT[:4], SamplingParams(max_tokens=10, temperature=1.3), None)
        for _ in range(3)
    ]
    crowded = Collected(crowded_engine, PROMPT, params, "acme/4")
    run_until_done(crowded_engine, [*noise, crowded])
    assert crowded.token_ids == alone.token_ids


class _SlowSource(LocalDirectorySource):
    """A real directory source whose fetch blocks until the test lets it go (a slow S3 download)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        self.release.wait(timeout=30)
        return super().fetch(adapter)


def test_a_loading_adapter_does_not_stall_the_running_batch(tiny_model_dir: Path, adapter_root: Path) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    source = _SlowSource(adapter_root)
    engine.adapters.source = source
    running = Collected(engine, PROMPT, GREEDY, None)
    engine.step()
    waiting = Collected(engine, PROMPT, GREEDY, "acme/3")
    for _ in range(10):
        engine.step()
    running.drain()
    waiting.drain()
    assert len(running.token_ids) == 11 and waiting.token_ids == []
    source.release.set()
    run_until_done(engine, [running, waiting])
    assert len(waiting.token_ids) == 20


def test_adapters_in_memory_stay_under_the_lru_bound(tiny_model_dir: Path, adapter_root: Path) -> None:
    engine = make_engine(tiny_model_dir, adapter_root, max_adapters=2)
    for n in (1, 2, 3, 4, 1):
        request = Collected(engine, PROMPT, SamplingParams(max_tokens=2, temperature=0), f"acme/{n}")
        run_until_done(engine, [request])
        assert len(engine.adapters.loaded_ids()) <= 2
    assert engine.adapters.loaded_ids() == ["acme/4", "acme/1"]
    assert engine.metrics.adapter_evictions._value.get() == 3


def test_a_load_that_ends_wakes_its_subscribers_and_its_waiters(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # no weights
    (tmp_path / "acme").symlink_to(adapter_root / "acme")
    engine = make_engine(tiny_model_dir, tmp_path)
    source = _SlowSource(tmp_path)
    engine.adapters.source = source
    settled = threading.Event()
    engine.adapters.on_settled(settled.set)
    held = Collected(engine, PROMPT, GREEDY, "acme/2")
    assert held.request.adapter_ref is not None
    assert not engine.adapters.wait(held.request.adapter_ref, timeout=0.2)  # its fetch is held
    assert not settled.is_set()
    source.release.set()
    assert engine.adapters.wait(held.request.adapter_ref, timeout=30)
    assert settled.wait(timeout=30)
    settled.clear()
    broken = Collected(engine, PROMPT, GREEDY, "bad/1")
    assert broken.request.adapter_ref is not None
    assert engine.adapters.wait(broken.request.adapter_ref, timeout=30)  # a failed load ends it too
    assert isinstance(engine.adapters.state(broken.request.adapter_ref), AdapterLoadError)
    assert settled.wait(timeout=30)
