"""The engine core: `LLMEngine.step()` schedules, runs and samples one step for all its requests.

It is single-threaded by design: `AsyncEngine` (async_engine.py) runs it on a thread of its own that
owns the model, the KV cache and the scheduler; HTTP handlers only post requests and aborts to it.
A failure inside one request ends that request with its error; the loop never stops for a request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.serving import speculator as speculative
from worker.serving.adapters import AdapterCache, AdapterSource
from worker.serving.detokenizer import IncrementalDetokenizer
from worker.serving.drafting import Drafter, row_starts
from worker.serving.eagle import DraftState, ModelShape
from worker.serving.errors import (
    EngineOverloadedError,
    InvalidParameterError,
    PromptTooLongError,
    ServingError,
)
from worker.serving.kv_cache import BlockManager
from worker.serving.lora import AdapterWeights
from worker.serving.metrics import ServingMetrics
from worker.serving.model_runner import ModelRunner
from worker.serving.outputs import FinishReason, SpeculationStats, TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.sampling import make_generator, sample_next_tokens
from worker.serving.scheduler import Scheduler
from worker.serving.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    model_name: str
    dtype: str = "fp32"
    device: str = "auto"  # a CUDA GPU when there is one, else the CPU
    max_batch_size: int = 32
    max_adapters: int = 16
    kv_cache_bytes: int | None = None  # None = 1 GiB
    max_model_len: int | None = None  # None = the model's context
    max_prefill_tokens: int = 4096  # per step; a longer single prompt still runs alone
    max_waiting: int = 1024  # requests queued beyond this are refused with 503
    # CPU only: steps of a few tokens use the compiled small-step kernel (model_runner.KERNEL_TOKENS), or
    # where it cannot be built, a second transposed copy of the weights (twice the weight memory).
    small_step_weights: bool = True
    # Speculate only while a step decodes at most this many sequences (None: 2 on the CPU, where two
    # sequences' 1 + 3 verified tokens fill the 8-row small-step kernel and more turn the step
    # compute-bound; 16 on a GPU). Larger batches decode one token a step, with the same output.
    speculation_max_batch: int | None = None
    # At most this many drafts per step (vLLM's num_speculative_tokens); None: each speculator's own
    # depth. Fewer drafts cost fewer verified rows and draft passes, and accept fewer tokens a step.
    speculation_depth: int | None = None


@dataclass(eq=False)
class _Request:
    """The engine thread's view of one request: its sequence and where its tokens go."""

    seq: Sequence
    detok: IncrementalDetokenizer
    deliver: queue.SimpleQueue[TokenOutput | BaseException] | None = None
    async_deliver: tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput | BaseException]] | None = None
    adapter: AdapterWeights | None = None
    # Proposed by the adapter's speculator and verified at the next step; for sampled requests also
    # the distributions they were drawn from (the rejection rule needs them).
    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    speculation: SpeculationStats | None = None  # counted from its first verification step
    draft_state: DraftState | None = None  # an eagle speculator's draft cache, rebuilt at each prefill

    def send(self, item: TokenOutput | BaseException) -> None:
        if self.async_deliver is not None:
            loop, q = self.async_deliver
            loop.call_soon_threadsafe(q.put_nowait, item)
        elif self.deliver is not None:
            self.deliver.put(item)


class LLMEngine:
    """Synchronous core: add requests, call `step()`; used by `AsyncEngine` and directly by tests."""

    def __init__(
        self, config: EngineConfig, source: AdapterSource, metrics: ServingMetrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or ServingMetrics()
        self.runner = ModelRunner(
            config.model_path,
            dtype=config.dtype,
            kv_cache_bytes=config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
            max_model_len=config.max_model_len,
            small_step_weights=config.small_step_weights,
            device=config.device,
        )
        self.tokenizer = self.runner.tokenizer
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.max_model_len = self.runner.max_model_len
        if config.speculation_max_batch is not None and config.speculation_max_batch < 1:
            raise ValueError(f"speculation_max_batch must be at least 1, not {config.speculation_max_batch}")
        if config.speculation_depth is not None and config.speculation_depth < 1:
            raise ValueError(f"speculation_depth must be at least 1, not {config.speculation_depth}")
        self.blocks = BlockManager(self.runner.cache.num_blocks)
        self.drafter = Drafter(
            self.runner,
            self.blocks,
            self.metrics,
            max_model_len=self.max_model_len,
            max_batch=config.speculation_max_batch or (16 if self.runner.device.type == "cuda" else 2),
            depth=config.speculation_depth,
        )
        self.metrics.kv_blocks_total.set(self.blocks.num_blocks)
        self.adapters = AdapterCache(
            source,
            max_adapters=config.max_adapters,
            num_layers=self.runner.num_layers,
            dtype=self.runner.dtype,
            device=self.runner.device,
            metrics=self.metrics,
            hidden_size=self.runner.hidden_size,
            model_shape=ModelShape(
                self.runner.hidden_size, self.runner.num_heads, self.runner.num_kv_heads, self.runner.head_dim
            ),
            kernel=self.runner.kernel,
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            is_ready=self._adapter_ready,
        )
        self._requests: dict[int, _Request] = {}

    # --- requests ------------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Checks that fail a request before it is queued (the caller gets the 4xx at once)."""
        if not prompt_token_ids:
            raise InvalidParameterError("the prompt is empty", field="prompt")
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_token_ids):
            raise InvalidParameterError(
                f"prompt token ids must be in [0, {self.runner.vocab_size})", field="prompt"
            )
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"this model's context is {self.max_model_len} tokens, but the request needs {total} "
                f"({len(prompt_token_ids)} in the prompt + max_tokens {params.max_tokens}); "
                "shorten the prompt or lower max_tokens",
                field="max_tokens" if len(prompt_token_ids) < self.max_model_len else "prompt",
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self.scheduler.waiting)} requests are waiting; retry shortly")

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        tenant: str | None = None,
        *,
        seq_id: int | None = None,
        arrival: float | None = None,
    ) -> _Request:
        self.validate(prompt_token_ids, params)
        key = self.adapters.request(adapter_id, tenant) if adapter_id else None
        seq = Sequence(list(prompt_token_ids), params, adapter_key=key, generator=make_generator(params.seed))
        if seq_id is not None:
            seq.seq_id = seq_id
        if arrival is not None:  # the caller's submit time: waiting in the inbox counts toward TTFT
            seq.arrival = arrival
        request = _Request(seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop))
        self._requests[seq.seq_id] = request
        self.scheduler.add(seq)
        return request

    def abort(self, seq_id: int) -> None:
        request = self._requests.get(seq_id)
        if request is not None:
            self._finish(request, FinishReason.ABORTED)

    def _adapter_ready(self, seq: Sequence) -> bool:
        return seq.adapter_key is None or self._requests[seq.seq_id].adapter is not None

    def _poll_adapters(self) -> None:
        """Hand finished loads to their waiting sequences; fail those whose adapter failed to load."""
        for seq in list(self.scheduler.waiting):
            request = self._requests[seq.seq_id]
            if seq.adapter_key is None or request.adapter is not None:
                continue
            state = self.adapters.state(seq.adapter_key)
            if isinstance(state, ServingError):
                self.metrics.requests.labels(finish_reason="error").inc()
                request.send(state)
                self._forget(request)
            elif state is not None:
                request.adapter = state
                self.adapters.pin(seq.adapter_key)

    # --- one step ------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        self._poll_adapters()
        return self.scheduler.has_work

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> int:
        """Run one prefill or decode step; returns how many tokens it generated (0 if idle)."""
        self._poll_adapters()
        seqs, is_prefill = self.scheduler.schedule()
        self._update_gauges()
        if not seqs:
            return 0
        requests = [self._requests[seq.seq_id] for seq in seqs]
        adapters, owner = self._active_adapters(requests)
        drafts = [[] for _ in seqs] if is_prefill else [self.drafter.to_verify(r) for r in requests]
        if is_prefill:
            step = self.runner.prefill_input(seqs, adapters, owner)
            self.metrics.prompt_tokens.inc(sum(len(s) for s in seqs))
        else:
            step = self.runner.decode_input(seqs, adapters, owner, drafts if any(drafts) else None)
        logits = self.runner.forward(step).cpu()  # sampling (and its seeded generators) run on the CPU
        emitted = self._choose_tokens(requests, logits, drafts)
        now = time.monotonic()
        generated = 0
        for request, tokens in zip(requests, emitted, strict=True):
            for token, logprob in tokens:
                generated += 1
                if self._emit(request, token, logprob, now):
                    break
        live = [r if r.seq.seq_id in self._requests else None for r in requests]
        self.drafter.propose(live, drafts, emitted, step.prefill_lengths)
        self.metrics.record_step(generated)
        self._update_gauges()
        return generated

    def _choose_tokens(
        self, requests: list[_Request], logits: torch.Tensor, drafts: list[list[int]]
    ) -> list[list[tuple[int, float]]]:
        """Per request the (token, logprob) pairs this step emits: one sampled, or the verified drafts."""
        starts = row_starts(drafts)
        chosen: list[list[tuple[int, float]]] = [[] for _ in requests]
        plain = [i for i, r in enumerate(requests) if not speculative.speculates(r.seq.params, r.adapter)]
        if plain:
            seqs = [requests[i].seq for i in plain]
            histories: list[torch.Tensor | list[int]] = (
                [torch.tensor(s.all_token_ids) for s in seqs] if _needs_history(seqs) else [[] for _ in seqs]
            )
            rows = logits[torch.tensor([starts[i] for i in plain])]
            tokens, logprobs = sample_next_tokens(
                rows, [s.params for s in seqs], histories, [s.generator for s in seqs]
            )
            for i, token, logprob in zip(plain, tokens.tolist(), logprobs.tolist(), strict=True):
                chosen[i] = [(token, logprob)]
        for i in range(len(requests)):
            if chosen[i]:
                continue
            chosen[i] = self.drafter.verify(requests[i], drafts[i], logits[starts[i] : starts[i + 1]])
        return chosen

    def _active_adapters(self, requests: list[_Request]) -> tuple[list[AdapterWeights], list[int]]:
        adapters: list[AdapterWeights] = []
        position: dict[str, int] = {}
        owner = []
        for request in requests:
            if request.adapter is None:
                owner.append(-1)
                continue
            if request.adapter.key not in position:
                position[request.adapter.key] = len(adapters)
                adapters.append(request.adapter)
            owner.append(position[request.adapter.key])
        return adapters, owner

    def _emit(self, request: _Request, token: int, logprob: float, now: float) -> bool:
        """Hands one token to the request; True if that finished it."""
        seq = request.seq
        index = len(seq.output_token_ids)
        seq.output_token_ids.append(token)
        seq.num_cached = len(seq) - 1
        if seq.last_token_time is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        text, stop_hit = request.detok.add(token)
        reason = self._finish_reason(seq, token, stop_hit)
        if reason is not None and reason is not FinishReason.STOP_SEQUENCE:
            text += request.detok.flush()
        request.send(
            TokenOutput(
                token_id=token,
                text=text,
                logprob=logprob,
                special=token in self.special_ids,
                index=index,
                finish_reason=reason,
                prompt_tokens=seq.num_prompt_tokens,
                elapsed=now - seq.arrival,
                speculation=request.speculation,
            )
        )
        if reason is not None:
            self._finish(request, reason, notify=False)
        return reason is not None

    def _finish_reason(self, seq: Sequence, token: int, stop_hit: bool) -> FinishReason | None:
        if stop_hit:
            return FinishReason.STOP_SEQUENCE
        if token in self.runner.eos_token_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        if len(seq.output_token_ids) >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: _Request, reason: FinishReason, *, notify: bool = True) -> None:
        seq = request.seq
        if seq.seq_id not in self._requests:
            return
        self.scheduler.finish(seq)
        self.metrics.requests.labels(finish_reason=reason.value).inc()
        if notify and reason is FinishReason.ABORTED:
            request.send(
                TokenOutput(
                    token_id=-1, text="", logprob=0.0, special=True, index=len(seq.output_token_ids),
                    finish_reason=reason, prompt_tokens=seq.num_prompt_tokens,
                    elapsed=time.monotonic() - seq.arrival, speculation=request.speculation,
                )
            )  # fmt: skip
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        seq = request.seq
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq)
        if request.adapter is not None and seq.adapter_key is not None:
            self.adapters.unpin(seq.adapter_key)
            request.adapter = None
        self._requests.pop(seq.seq_id, None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_blocks_used.set(self.blocks.num_used)

    def fail_all(self, error: BaseException) -> None:
        for request in list(self._requests.values()):
            request.send(error)
            self._forget(request)


def _needs_history(seqs: list[Sequence]) -> bool:
    return any(s.params.repetition_penalty != 1.0 for s in seqs)
