"""Driving the synchronous engine in tests, and HF's own greedy generation as the reference."""

from __future__ import annotations

import queue
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from worker.serving.adapters import LocalDirectorySource
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams


def make_engine(model_dir: Path, adapter_root: Path, **config: object) -> LLMEngine:
    settings = {
        "model_path": model_dir,
        "model_name": "tiny-random-llama",
        "kv_cache_bytes": 64 << 20,
    } | config
    return LLMEngine(EngineConfig(**settings), LocalDirectorySource(adapter_root))  # type: ignore[arg-type]


class Collected:
    """One request added to a synchronous engine, with everything it has been sent."""

    def __init__(
        self, engine: LLMEngine, prompt: list[int], params: SamplingParams, adapter: str | None
    ) -> None:
        self.request = engine.add_request(prompt, params, adapter)
        self.request.deliver = queue.SimpleQueue()
        self.outputs: list[TokenOutput] = []
        self.error: BaseException | None = None

    def drain(self) -> None:
        assert self.request.deliver is not None
        while not self.request.deliver.empty():
            item = self.request.deliver.get()
            if isinstance(item, BaseException):
                self.error = item
            else:
                self.outputs.append(item)

    @property
    def token_ids(self) -> list[int]:
        return [o.token_id for o in self.outputs]

    @property
    def done(self) -> bool:
        """Failed, or every one of its n choices finished."""
        finished = sum(output.finished for output in self.outputs)
        return self.error is not None or finished == self.request.seq.params.n


def wait_for_adapters(engine: LLMEngine, collected: list[Collected], timeout_s: float = 60.0) -> None:
    """Blocks until every request's adapter is loaded or failed to load (each load is a future)."""
    for c in collected:
        if c.request.adapter_ref is not None:
            assert engine.adapters.wait(c.request.adapter_ref, timeout_s), "the adapters did not load"


def step(engine: LLMEngine) -> int:
    """One engine step; when nothing could run, waits for an adapter load in flight to end."""
    generated = engine.step()
    if generated == 0:
        engine.adapters.wait_for_load(timeout=1.0)
    return generated


def run_until_done(engine: LLMEngine, collected: list[Collected], timeout_s: float = 60.0) -> None:
    """Steps until every request finished. Their adapters are loaded (or failed) before the first step,
    so the batches are the same every run: a request whose adapter loads a step late would join later,
    and how many drafts the others get, and whether they speculate at all, would change with it."""
    deadline = time.monotonic() + timeout_s
    wait_for_adapters(engine, collected, timeout_s)
    while time.monotonic() < deadline:
        for c in collected:
            c.drain()
        if all(c.done for c in collected):
            return
        step(engine)
    raise AssertionError("the engine did not finish its requests")


def hf_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int], new_tokens: int) -> list[int]:
    """What HF (with PEFT for an adapter) generates greedily for one request alone, EOS ignored."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            attention_mask=None,
        )
    return out[0, len(prompt) :].tolist()


@cache
def _reference_model(model_dir: Path, adapter_dir: Path | None) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def hf_log_probs(model_dir: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """HF's (PEFT's for an adapter) log_softmax of the logits `[len(ids), V]`, fp32: row p is the
    distribution of token p + 1."""
    with torch.no_grad():
        logits = _reference_model(model_dir, adapter_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
