"""Owns the measured speedup of a published turbo artifact: the serving engine decodes held-out prompts
greedily, one request at a time, with the artifact's speculator and without it.

Worker glue, not training: the training library never loads the serving engine; the worker measures
what a run published before it stores the artifact.

Cost, bounded: one engine load of the base model (in the run's dtype and on its device), then at most
MAX_PROMPTS prompts x MAX_NEW_TOKENS tokens in each of the two modes, plus one short warm-up request per
mode: at most 2 x (8 x 32 + 8) generated tokens.
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tuneforge.rules.artifacts import ADAPTER_CONFIG, SPECULATOR_FILES

from worker.serving.adapters import LocalDirectorySource
from worker.serving.cpu_kernels import KernelConfig
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.kv_cache import BLOCK_SIZE, BlockManager
from worker.serving.metrics import ServingMetrics
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.training.loop import TrainingResult, write_summary
from worker.training.quality import HELD_OUT_PROMPTS

log = logging.getLogger(__name__)

MAX_PROMPTS = HELD_OUT_PROMPTS  # a run hands back at most this many
MAX_NEW_TOKENS = 32
WARMUP_TOKENS = 8  # first-request costs (thread pools, LoRA stacks) are not what a deployment pays per token
REQUEST_TIMEOUT_S = 120.0
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_SPECULATIVE_ID, _PLAIN_ID = "speculative/1", "plain/1"


@dataclass(frozen=True)
class _Pass:
    """One mode's decoding: outputs, decode tokens (each request's first, the prefill's, left out) and
    their time, and the engine's speculation counters over the pass."""

    outputs: list[list[int]]
    decode_tokens: int
    decode_seconds: float
    spec_steps: float
    spec_drafted: float
    spec_accepted: float


def add_to_summary(result: TrainingResult, kernels: KernelConfig = KernelConfig()) -> None:
    """Turbo types: time the published artifact and record it as the summary's `speculator.measured`, in
    result.summary and in the artifact's training_summary.json alike (the version's metrics read both).
    `kernels`: the CPU kernel settings serving runs with (default: on, default cache).
    """
    speculator = result.summary.get("speculator")
    if speculator is None or result.adapter_dir is None or not result.held_out_prompts:
        return
    runtime = result.summary["runtime"]
    speculator["measured"] = measure(
        result.adapter_dir,
        result.model_dir,
        result.held_out_prompts,
        dtype=runtime["dtype"],
        device=runtime["device"],
        kernels=kernels,
    )
    write_summary(result.adapter_dir, result.summary)


def measure(
    artifact: Path,
    model_dir: Path,
    prompts: Sequence[list[int]],
    *,
    dtype: str,
    device: str,
    kernels: KernelConfig = KernelConfig(),
) -> dict[str, Any]:
    """The `measured` entry of the speculator summary; `{"error": ...}` when the engine cannot do it.

    A failure here never fails the training run: the artifact is good whether or not it was timed.
    """
    threads = torch.get_num_threads()  # the engine's small steps set one thread; the worker must get all back
    try:
        chosen = list(prompts[:MAX_PROMPTS])
        return _measure(artifact, model_dir, chosen, dtype=dtype, device=device, kernels=kernels)
    except Exception as exc:
        log.exception("measuring the speculator's speedup failed")
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.set_num_threads(threads)


def _measure(
    artifact: Path,
    model_dir: Path,
    prompts: list[list[int]],
    *,
    dtype: str,
    device: str,
    kernels: KernelConfig,
) -> dict[str, Any]:
    if not prompts:
        raise ValueError("no held-out prompt to decode")
    with tempfile.TemporaryDirectory(prefix="turbo-speedup-") as scratch:
        root = Path(scratch)
        plain_id = _link_adapters(artifact, root)
        max_len = max(len(prompt) for prompt in prompts) + MAX_NEW_TOKENS
        config = EngineConfig(
            model_path=model_dir,
            model_name=model_dir.name,
            dtype=dtype,
            device=device,
            max_batch_size=1,
            max_adapters=2,
            kv_cache_bytes=_kv_cache_bytes(model_dir, dtype, max_len),
            max_model_len=max_len,
            kernels=kernels,
        )
        engine = LLMEngine(config, LocalDirectorySource(root), ServingMetrics())
        try:
            plain = _decode(engine, prompts, plain_id)
            speculative = _decode(engine, prompts, _SPECULATIVE_ID)
        finally:
            engine.adapters.shutdown()
    return _result(prompts, plain, speculative)


def _link_adapters(artifact: Path, root: Path) -> str | None:
    """`<root>/speculative/1`: the artifact; `<root>/plain/1`: its LoRA without the heads. Returns the
    plain mode's adapter id: None for heads on the base model, whose plain mode is the base model."""
    _link(artifact, root / _SPECULATIVE_ID, skip=set())
    if not (artifact / ADAPTER_CONFIG).is_file():
        return None
    _link(artifact, root / _PLAIN_ID, skip=set(SPECULATOR_FILES))
    return _PLAIN_ID


def _link(artifact: Path, target: Path, *, skip: set[str]) -> None:
    target.mkdir(parents=True)
    for path in artifact.iterdir():
        if path.is_file() and path.name not in skip:
            (target / path.name).symlink_to(path.resolve())


def _kv_cache_bytes(model_dir: Path, dtype: str, max_len: int) -> int:
    """Room for one sequence of max_len tokens (requests run one at a time), and a block to spare."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    per_token = 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * ELEMENT_BYTES[dtype]
    return (BlockManager.blocks_needed(max_len) + 1) * BLOCK_SIZE * per_token


def _decode(engine: LLMEngine, prompts: list[list[int]], adapter_id: str | None) -> _Pass:
    """Greedy, one request after another, after one short warm-up request that is not counted."""
    _generate(engine, prompts[0], adapter_id, WARMUP_TOKENS)
    metrics = engine.metrics
    counters = (metrics.spec_steps, metrics.spec_drafted, metrics.spec_accepted)
    before = [counter._value.get() for counter in counters]
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        generated = _generate(engine, prompt, adapter_id, MAX_NEW_TOKENS)
        outputs.append([output.token_id for output in generated])
        tokens += len(generated) - 1
        seconds += generated[-1].elapsed - generated[0].elapsed
    steps, drafted, accepted = (counter._value.get() - b for counter, b in zip(counters, before, strict=True))
    return _Pass(outputs, tokens, seconds, steps, drafted, accepted)


def _generate(
    engine: LLMEngine, prompt: list[int], adapter_id: str | None, max_tokens: int
) -> list[TokenOutput]:
    """Every token of one request, run alone to the end through `step()`."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    request = engine.add_request(prompt, params, adapter_id)
    delivered: queue.SimpleQueue[TokenOutput | BaseException] = queue.SimpleQueue()
    request.deliver = delivered
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while engine.has_unfinished:
        if time.monotonic() > deadline:
            engine.abort(request.seq.seq_id)
            raise TimeoutError(f"a {max_tokens}-token request took over {REQUEST_TIMEOUT_S:.0f} s")
        if engine.step() == 0:  # nothing to run until the adapter's load (a background thread) ends
            engine.adapters.wait_for_load(timeout=max(0.0, deadline - time.monotonic()))
    outputs: list[TokenOutput] = []
    while not delivered.empty():
        item = delivered.get()
        if isinstance(item, BaseException):
            raise item
        outputs.append(item)
    if not outputs:
        raise RuntimeError("the engine finished a request without a token")
    return outputs


def _result(prompts: list[list[int]], plain: _Pass, speculative: _Pass) -> dict[str, Any]:
    if plain.decode_seconds <= 0 or speculative.decode_seconds <= 0:
        raise ValueError("every output ended after its first token: no decoding to time")
    plain_rate = plain.decode_tokens / plain.decode_seconds
    speculative_rate = speculative.decode_tokens / speculative.decode_seconds
    steps = speculative.spec_steps
    return {
        "prompts": len(prompts),
        "max_new_tokens": MAX_NEW_TOKENS,
        "plain_tokens_per_s": round(plain_rate, 2),
        "speculative_tokens_per_s": round(speculative_rate, 2),
        "speedup": round(speculative_rate / plain_rate, 3),
        # Tokens emitted per verification step (the accepted drafts plus the model's own token).
        "mean_accepted_length": round((speculative.spec_accepted + steps) / steps, 3) if steps else 1.0,
        "acceptance_rate": (
            round(speculative.spec_accepted / speculative.spec_drafted, 3)
            if speculative.spec_drafted
            else 0.0
        ),
        # Greedy speculation must emit exactly what plain greedy decoding does.
        "identical_outputs": sum(a == b for a, b in zip(plain.outputs, speculative.outputs, strict=True)),
    }
