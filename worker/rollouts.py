"""Glue: GRPO's rollouts sampled by tuneforge's serving engine in the training worker, with the adapter
being trained pushed into the engine before each batch (worker/training/grpo.py's `RolloutSampler`)."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from worker.serving.adapters import ResolvedAdapter
from worker.serving.cpu_kernels import KernelConfig
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.errors import AdapterNotFoundError
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.request import EngineRequest
from worker.training.grpo_rollouts import AdapterSnapshot, Completion, RolloutParams

POLICY_ADAPTER = "grpo-policy"  # the name the trained adapter is installed under in the engine
DEFAULT_ROLLOUT_KV_CACHE_BYTES = 1 << 30
DEFAULT_MAX_BATCH = 64  # sequences decoded together


class _NoStoredAdapters:
    """The rollout engine serves only the adapter installed in memory; it looks nothing up."""

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        raise AdapterNotFoundError(f"adapter {adapter_id} is not served by the rollout engine")

    def fetch(self, adapter: ResolvedAdapter) -> Path:
        raise AdapterNotFoundError(f"adapter {adapter.adapter_id} is not served by the rollout engine")

    def list_available(self, tenant: str | None) -> list[str]:
        return []


def rollout_dtype(device: str = "auto") -> str:
    """bf16 on a GPU that has it (as the trained LoRA's base computes there), fp32 on the CPU."""
    cuda = device != "cpu" and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


class EngineRolloutSampler:
    """Completions from a synchronous `LLMEngine` on the base model's directory, driven on the caller's
    thread (the training thread: sampling and training alternate, they never overlap)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_bytes: int = DEFAULT_ROLLOUT_KV_CACHE_BYTES,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        kernels: KernelConfig | None = None,
    ) -> None:
        config = EngineConfig(
            model_path=model_dir,
            model_name=POLICY_ADAPTER,
            dtype=dtype or rollout_dtype(device),
            device=device,
            max_batch_size=max_batch_size,
            kv_cache_bytes=kv_cache_bytes,
            max_model_len=max_model_len,
            kernels=kernels or KernelConfig(),
        )
        self.engine = LLMEngine(config, _NoStoredAdapters())

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: RolloutParams,
        seed: int,
        adapter: AdapterSnapshot | None,
    ) -> list[list[Completion]]:
        """`n` completions of each prompt, each its own request seeded from (seed, prompt, choice)."""
        engine = self.engine
        resolved = None
        if adapter is not None:
            resolved = engine.install_adapter(POLICY_ADAPTER, adapter.config, adapter.state)
        jobs = ((i, j) for i in range(len(prompts)) for j in range(n))
        sent: list[tuple[int, int, queue.SimpleQueue[TokenOutput | BaseException]]] = []
        for i, j, request in self._submitted(jobs, prompts, params, seed, n, resolved):
            request.deliver = queue.SimpleQueue()
            sent.append((i, j, request.deliver))
        groups: list[list[Completion]] = [[Completion([], []) for _ in range(n)] for _ in prompts]
        for i, j, delivered in sent:
            groups[i][j] = _completion(delivered)
        return groups

    def _submitted(
        self,
        jobs: Iterator[tuple[int, int]],
        prompts: Sequence[Sequence[int]],
        params: RolloutParams,
        seed: int,
        n: int,
        adapter: ResolvedAdapter | None,
    ) -> Iterator[tuple[int, int, EngineRequest]]:
        """Adds requests while the queue has room (the engine refuses more than its waiting limit), and
        steps the engine until every one has finished."""
        engine = self.engine
        room = max(1, engine.config.max_waiting // 2)
        pending = True
        while pending or engine.has_unfinished:
            while pending and len(engine.scheduler.waiting) < room:
                job = next(jobs, None)
                if job is None:
                    pending = False
                    break
                i, j = job
                sampling = SamplingParams(
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k or 0,
                    seed=(seed * 9973 + i * n + j) % (2**62),
                )
                request = engine.add_request(list(prompts[i]), sampling, adapter)
                yield i, j, request
            if engine.step() == 0 and engine.has_unfinished and not engine.scheduler.has_work:
                raise RuntimeError("the rollout engine has unfinished requests but nothing it can run")

    def close(self) -> None:
        self.engine.fail_all(RuntimeError("the rollout engine stopped"))
        self.engine.adapters.shutdown()
        self.engine.runner.release_cache()


def _completion(delivered: queue.SimpleQueue[TokenOutput | BaseException]) -> Completion:
    """A finished request's tokens; a failed request fails the batch (a group's advantages need every
    one of its completions)."""
    tokens: list[TokenOutput] = []
    while not delivered.empty():
        item = delivered.get()
        if isinstance(item, BaseException):
            raise item
        tokens.append(item)
    tokens.sort(key=lambda t: t.index)
    return Completion([t.token_id for t in tokens], [t.logprob for t in tokens])
