"""Owns the serving engine the worker loads on a published artifact: set up the way a deployment serves
it (dtype, adapter files, stopping at EOS), with room for one request at a time, and one greedy request
run to its end.

A LoRA or speculator artifact is served as an adapter of the base model, as a deployment serves it: its
files as they are (`speculative/1`), and for a LoRA with heads also the LoRA alone (`plain/1`), for timing
the heads. A whole model (full / last_layer) is served as the engine's model instead.
"""

from __future__ import annotations

import contextlib
import json
import queue
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tuneforge.rules.artifacts import SPECULATOR_FILES, ArtifactManifest

from worker.commands import SERVE_DTYPE
from worker.serving.adapters import LocalDirectorySource
from worker.serving.cpu_kernels import KernelConfig
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.kv_cache import BLOCK_SIZE, BlockManager
from worker.serving.metrics import ServingMetrics
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams

# The dtype every check computes in: a deployment's. The control plane starts `tuneforge serve` without
# --dtype, so its deployments run in that command's default, whatever dtype the run trained in (bf16 on
# a CPU or GPU that computes it natively). Answers and speeds measured in the training dtype are not the
# deployment's: a bf16 base flips near-tied greedy tokens that fp32 does not.
DEPLOYMENT_DTYPE = SERVE_DTYPE
REQUEST_TIMEOUT_S = 120.0
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ARTIFACT_ID, LORA_ONLY_ID = "speculative/1", "plain/1"


def is_adapter(artifact: Path) -> bool:
    """Whether a deployment serves this artifact as an adapter (LoRA and/or speculator heads)."""
    manifest = ArtifactManifest.of_directory(artifact)
    return manifest.has_lora_config or manifest.has_speculator


@dataclass(frozen=True)
class ServedArtifact:
    """A loaded engine and the adapter ids that name the artifact in it (None: the engine's model)."""

    engine: LLMEngine
    artifact_id: str | None  # the artifact as a deployment serves it
    lora_only_id: str | None  # a LoRA with heads, without its heads; None where that is the base model
    dtype: str
    device: str  # where the engine computes: "cpu", "cuda"


@contextlib.contextmanager
def served(
    model_dir: Path,
    artifact: Path | None,
    *,
    max_len: int,
    device: str,
    kernels: KernelConfig = KernelConfig(),
) -> Iterator[ServedArtifact]:
    """An engine on `model_dir` with `artifact` as its adapters (None: the model alone), for requests of
    at most `max_len` tokens run one at a time. Torch's thread count is restored on exit (the engine's
    small steps set one thread; the worker must get all back)."""
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="artifact-checks-") as scratch:
            root = Path(scratch)
            artifact_id, lora_only_id = _link_adapters(artifact, root) if artifact else (None, None)
            config = EngineConfig(
                model_path=model_dir,
                model_name=model_dir.name,
                dtype=DEPLOYMENT_DTYPE,
                device=device,
                max_batch_size=1,
                max_adapters=2,
                kv_cache_bytes=_kv_cache_bytes(model_dir, DEPLOYMENT_DTYPE, max_len),
                max_model_len=max_len,
                kernels=kernels,
            )
            engine = LLMEngine(config, LocalDirectorySource(root), ServingMetrics())
            try:
                device_type = engine.runner.device.type
                yield ServedArtifact(engine, artifact_id, lora_only_id, DEPLOYMENT_DTYPE, device_type)
            finally:
                engine.adapters.shutdown()
    finally:
        torch.set_num_threads(threads)


def _link_adapters(artifact: Path, root: Path) -> tuple[str, str | None]:
    """`<root>/speculative/1`: the artifact; `<root>/plain/1`: a LoRA's files without the heads, when it
    has heads. Returns (artifact id, LoRA-only id or None)."""
    _link(artifact, root / ARTIFACT_ID, skip=set())
    manifest = ArtifactManifest.of_directory(artifact)
    if not (manifest.has_lora_config and manifest.has_speculator):
        return ARTIFACT_ID, None
    _link(artifact, root / LORA_ONLY_ID, skip=set(SPECULATOR_FILES))
    return ARTIFACT_ID, LORA_ONLY_ID


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


def generate(
    engine: LLMEngine, prompt: list[int], adapter_id: str | None, max_tokens: int
) -> list[TokenOutput]:
    """Every token of one greedy request, run alone to its end (EOS or max_tokens) through `step()`."""
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
