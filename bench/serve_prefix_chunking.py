"""Workloads (d) and (e) of bench/serve_throughput.py: prefix caching and chunked prefill, each run with
the feature off and on in one run, through `AsyncEngine` on the base model (no adapters).

(d) --shared-requests requests (32) at once, each a --system-tokens (500) shared system prompt plus
    its own 10-token question, --shared-new-tokens (16) each: time to first token p50/p99 (caller's
    clock, from the common submit) and tok/s, prefix caching off and on (one request warms the system
    prompt first, as a server that has served it before would have it cached).
(e) --streams (8) streams decoding while --long-prompts (8) prompts of --long-tokens (1000) arrive:
    inter-token latency p99 of the streams' tokens over the window the long prompts join in, with a
    step budget of --step-tokens (256) prefill tokens, chunked prefill off (a prefill step stalls every
    stream) and on (steps mix the streams' tokens with chunks).
Never a pass/fail; greedy outputs are checked equal between off and on.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import numpy as np


def _engine(model_dir: Path, name: str, **switches: Any) -> Any:
    from worker.serving.adapters import LocalDirectorySource
    from worker.serving.async_engine import AsyncEngine
    from worker.serving.engine import EngineConfig

    config = EngineConfig(model_path=model_dir, model_name=name, max_batch_size=64, **switches)
    engine = AsyncEngine(config, source=LocalDirectorySource(model_dir / "no-adapters"))
    engine.start()
    return engine


async def _stream(engine: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """The tokens and when each reached this caller (`time.perf_counter()`)."""
    from worker.serving.params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens, received = [], []
    async for out in engine.generate(prompt, params, None):
        tokens.append(out.token_id)
        received.append(time.perf_counter())
    return tokens, received


def _ids(rng: random.Random, count: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(count)]


async def _shared_prefix(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    await _stream(engine, prompts[0], 2)  # warm-up: the system prompt is cached when caching is on
    started = time.perf_counter()
    results = await asyncio.gather(*(_stream(engine, p, new_tokens) for p in prompts))
    seconds = time.perf_counter() - started
    ttft = [received[0] - started for _, received in results]
    return {
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tok_s": sum(len(t) for t, _ in results) / seconds,
        "tokens": [t for t, _ in results],
    }


async def _long_prompts_join(
    engine: Any, streams: list[list[int]], longs: list[list[int]], new_tokens: int
) -> dict[str, Any]:
    running = [asyncio.create_task(_stream(engine, p, new_tokens)) for p in streams]
    await asyncio.sleep(0.5)  # the streams are decoding when the long prompts arrive
    joined = time.perf_counter()
    long_results = await asyncio.gather(*(_stream(engine, p, 2) for p in longs))
    done = max(received[-1] for _, received in long_results)
    results = await asyncio.gather(*running)
    gaps = [b - a for _, received in results for a, b in itertools.pairwise(received) if joined <= b <= done]
    return {
        "itl_p99_s": float(np.percentile(gaps, 99)) if gaps else float("nan"),
        "stream_tokens_in_window": len(gaps),
        "tokens": [t for t, _ in results] + [t for t, _ in long_results],
    }


def run(model_dir: Path, name: str, vocab: int, args: Any) -> dict[str, Any]:
    """Both workloads, each feature off then on; prints a table and returns the numbers."""
    rng = random.Random(1234)
    system = _ids(rng, args.system_tokens, vocab)
    shared = [system + _ids(rng, 10, vocab) for _ in range(args.shared_requests)]
    streams = [_ids(rng, 20, vocab) for _ in range(args.streams)]
    longs = [_ids(rng, args.long_tokens, vocab) for _ in range(args.long_prompts)]
    results: dict[str, Any] = {}
    for label, on in (("off", False), ("on", True)):
        engine = _engine(model_dir, name, enable_prefix_caching=on, enable_chunked_prefill=False)
        try:
            shared_run = _shared_prefix(engine, shared, args.shared_new_tokens)
            results[f"d_prefix_{label}"] = asyncio.run(shared_run)
        finally:
            engine.shutdown()
        engine = _engine(
            model_dir,
            name,
            enable_prefix_caching=False,
            enable_chunked_prefill=on,
            max_prefill_tokens=args.step_tokens,
        )
        try:
            results[f"e_chunked_{label}"] = asyncio.run(
                _long_prompts_join(engine, streams, longs, args.stream_tokens)
            )
        finally:
            engine.shutdown()
    d_off, d_on = results["d_prefix_off"], results["d_prefix_on"]
    e_off, e_on = results["e_chunked_off"], results["e_chunked_on"]
    print(f"(d) {args.shared_requests} requests sharing a {args.system_tokens}-token system prompt:")
    for label, d in (("prefix caching off", d_off), ("prefix caching on ", d_on)):
        print(
            f"    {label}: TTFT p50 {d['ttft_p50_s']:.3f} s  p99 {d['ttft_p99_s']:.3f} s  "
            f"{d['tok_s']:.1f} tok/s"
        )
    print(
        f"    on vs off: TTFT p50 {d_off['ttft_p50_s'] / d_on['ttft_p50_s']:.1f}x lower, "
        f"{d_on['tok_s'] / d_off['tok_s']:.1f}x the tok/s"
    )
    print(f"    same greedy tokens: {d_off['tokens'] == d_on['tokens']}")
    print(
        f"(e) {args.streams} streams decoding while {args.long_prompts} prompts of {args.long_tokens} "
        f"tokens arrive ({args.step_tokens} prefill tokens a step):"
    )
    for label, e in (("chunked prefill off", e_off), ("chunked prefill on ", e_on)):
        print(
            f"    {label}: inter-token latency p99 {e['itl_p99_s']:.3f} s "
            f"({e['stream_tokens_in_window']} stream tokens while they joined)"
        )
    print(f"    on vs off: inter-token latency p99 {e_off['itl_p99_s'] / e_on['itl_p99_s']:.1f}x lower")
    print(f"    same greedy tokens: {e_off['tokens'] == e_on['tokens']}")
    for value in results.values():
        value.pop("tokens")
    return results
