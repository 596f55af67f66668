"""The engine core: `LLMEngine.step()` schedules, runs and samples one step for all its requests.

It is single-threaded by design: `AsyncEngine` (async_engine.py) runs it on a thread of its own that
owns the model, the KV cache and the scheduler; HTTP handlers only post requests and aborts to it.
A failure inside one request ends that request with its error; the loop never stops for a request.
A failure inside a step is pinned on the requests of one adapter (`_compute`): they fail, the adapter
is refused for a while, and the step runs again for the others, who emit what they would have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tuneforge.lora_rules import DEFAULT_MAX_LORA_RANK

from worker.serving.adapter_loader import LoadShape, adapter_from_state
from worker.serving.adapters import (
    DEFAULT_RESOLVE_TTL_S,
    AdapterCache,
    AdapterSource,
    ResolvedAdapter,
)
from worker.serving.cpu_kernels import KernelConfig
from worker.serving.detokenizer import IncrementalDetokenizer
from worker.serving.drafting import Drafter
from worker.serving.eagle import EagleDraft, ModelShape
from worker.serving.embedding import Embedder
from worker.serving.errors import (
    AdapterLoadError,
    EngineError,
    EngineOverloadedError,
    ServingError,
)
from worker.serving.forking import check_choices_fit, fork_generators, make_forks
from worker.serving.guided import GrammarCompiler
from worker.serving.kv_cache import BlockManager
from worker.serving.metrics import ServingMetrics
from worker.serving.model_runner import ModelRunner
from worker.serving.outputs import FinishReason, PromptLogprobs, TokenOutput, TopLogprobs
from worker.serving.params import SamplingParams, check_prompt_fits
from worker.serving.penalties import check_logit_bias_vocabulary
from worker.serving.request import EngineRequest
from worker.serving.sampling import make_generator
from worker.serving.scheduler import Scheduler
from worker.serving.sequence import Sequence, SequenceStatus
from worker.serving.stepping import StepComputer

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
    # Prefill tokens per step; a longer single prompt still runs alone, or with chunked prefill, the
    # step's whole token budget (a longer prompt is prefilled in chunks).
    max_prefill_tokens: int = 4096
    # Reuse the KV blocks of a prompt's cached prefix (same tokens, same adapter) instead of prefilling
    # them again (kv_cache.BlockManager). Requests asking for prompt logprobs and eagle-speculating
    # adapters always prefill their whole prompt.
    enable_prefix_caching: bool = True
    # Prefill long prompts in chunks within max_prefill_tokens per step, in steps that also decode the
    # running sequences (scheduler.py): running streams keep producing tokens while a long prompt joins.
    # Requests asking for prompt logprobs are prefilled whole.
    enable_chunked_prefill: bool = True
    max_waiting: int = 1024  # requests queued beyond this are refused with 503
    # CPU only: steps of a few tokens use the compiled small-step kernel (model_runner.KERNEL_TOKENS), or
    # where it cannot be built, a second transposed copy of the weights (twice the weight memory).
    small_step_weights: bool = True
    # Whether and where the small-step kernel is built (entry points take it from Settings).
    kernels: KernelConfig = field(default_factory=KernelConfig)
    # Speculate only while a step decodes at most this many sequences (None: 2 on the CPU, where two
    # sequences' 1 + 3 verified tokens fill the 8-row small-step kernel and more turn the step
    # compute-bound; 16 on a GPU). Larger batches decode one token a step, with the same output.
    speculation_max_batch: int | None = None
    # At most this many drafts per step (vLLM's num_speculative_tokens); None: each speculator's own
    # depth. Fewer drafts cost fewer verified rows and draft passes, and accept fewer tokens a step.
    speculation_depth: int | None = None
    # Adapters of a higher rank are refused at load (`tuneforge serve --max-lora-rank`).
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    # What an adapter id resolved to is reused this long: a deleted version is served at most this long.
    adapter_resolve_ttl_s: float = DEFAULT_RESOLVE_TTL_S


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
            kernels=config.kernels,
        )
        self.tokenizer = self.runner.tokenizer
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.max_model_len = self.runner.max_model_len
        if config.speculation_max_batch is not None and config.speculation_max_batch < 1:
            raise ValueError(f"speculation_max_batch must be at least 1, not {config.speculation_max_batch}")
        if config.speculation_depth is not None and config.speculation_depth < 1:
            raise ValueError(f"speculation_depth must be at least 1, not {config.speculation_depth}")
        self.blocks = BlockManager(
            self.runner.cache.num_blocks,
            prefix_caching=config.enable_prefix_caching,
            on_lookup=self.metrics.record_prefix_lookup,
        )
        # Output constraints compile against this tokenizer and the logits' width (the routes compile
        # them before a request is queued; add_request finds them in its cache).
        self.grammars = GrammarCompiler(self.tokenizer, self.runner.vocab_size, self.runner.eos_token_ids)
        self.drafter = Drafter(
            self.runner,
            self.blocks,
            self.metrics,
            max_model_len=self.max_model_len,
            max_batch=config.speculation_max_batch or (16 if self.runner.device.type == "cuda" else 2),
            depth=config.speculation_depth,
        )
        self.metrics.kv_blocks_total.set(self.blocks.num_blocks)
        if not 1 <= config.max_lora_rank <= DEFAULT_MAX_LORA_RANK:
            raise ValueError(
                f"max_lora_rank must be in 1..{DEFAULT_MAX_LORA_RANK}, not {config.max_lora_rank}"
            )
        self.adapters = self._adapter_cache(source, config)
        self.scheduler = Scheduler(
            self.blocks,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            is_ready=self._adapter_ready,
            may_reuse=self._may_reuse_prefix,
            chunked_prefill=config.enable_chunked_prefill,
            may_chunk=self._prefills_in_parts,
        )
        self._requests: dict[int, EngineRequest] = {}
        self._families: dict[int, list[EngineRequest]] = {}  # n > 1: every choice, by the parent's id
        self._installs: dict[str, int] = {}  # install_adapter: how many times each name was installed
        self._installed: dict[str, str] = {}  # install_adapter: name -> the key its weights are held under
        self.computer = StepComputer(self.runner, self.drafter, self)
        # Embedding requests: a bounded pass of them runs before each generation step (embedding.py).
        self.embedder = Embedder(
            self.runner,
            self.adapters,
            max_batch_tokens=config.max_prefill_tokens,
            max_waiting=config.max_waiting,
        )

    def _adapter_cache(self, source: AdapterSource, config: EngineConfig) -> AdapterCache:
        """Adapters load against this runner's real shapes and dtype, within the deployment's rank limit."""
        runner = self.runner
        return AdapterCache(
            source,
            max_adapters=config.max_adapters,
            shape=LoadShape(
                num_layers=runner.num_layers,
                dtype=runner.dtype,
                device=runner.device,
                hidden_size=runner.hidden_size,
                model_shape=ModelShape(
                    runner.hidden_size,
                    runner.num_heads,
                    runner.num_kv_heads,
                    runner.head_dim,
                ),
                kernel=runner.kernel,
                module_shapes=runner.module_shapes,
                max_rank=config.max_lora_rank,
                vocab_size=runner.vocab_size,
                eagle_refusal=runner.arch.eagle_refusal,
            ),
            metrics=self.metrics,
            resolve_ttl_s=config.adapter_resolve_ttl_s,
        )

    def install_adapter(
        self, name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
    ) -> ResolvedAdapter:
        """Serve a LoRA held in memory (PEFT config + state dict) as `name`, replacing the weights an
        earlier call installed under it: a trainer pushes its current adapter before each batch of
        rollouts. Each call holds the weights under a fresh key, so KV blocks cached under the old
        weights are never reused as a prefix; requests already running finish on the old ones."""
        self._installs[name] = self._installs.get(name, 0) + 1
        key = f"{name}#installed-{self._installs[name]}"
        weights = adapter_from_state(key, config, state, self.adapters.shape)
        previous = self._installed.get(name)
        adapter = ResolvedAdapter(name, None, key)
        self.adapters.install(adapter, weights)
        self._installed[name] = key
        if previous is not None:
            self.adapters.drop(previous)
        return adapter

    # --- requests ------------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Checks that fail a request before it is queued (the caller gets the 4xx at once)."""
        check_prompt_fits(prompt_token_ids, params, self.runner.vocab_size, self.max_model_len)
        check_logit_bias_vocabulary(params, self.runner.vocab_size)
        check_choices_fit(len(prompt_token_ids), params, self.blocks.num_blocks, self.config.max_batch_size)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self.scheduler.waiting)} requests are waiting; retry shortly")

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | str | None = None,
        tenant: str | None = None,
        *,
        seq_id: int | None = None,
        arrival: float | None = None,
    ) -> EngineRequest:
        """Queue one request. `adapter` is resolved already (what AsyncEngine passes) or an id, which is
        resolved here, blocking (tests and benches drive the engine this way)."""
        self.validate(prompt_token_ids, params)
        if isinstance(adapter, str):
            adapter = self.adapters.resolve(adapter, tenant)
        key = self.adapters.request(adapter) if adapter is not None else None
        seq = Sequence(list(prompt_token_ids), params, adapter_key=key, generator=make_generator(params.seed))
        if seq_id is not None:
            seq.seq_id = seq_id
        if arrival is not None:  # the caller's submit time: waiting in the inbox counts toward TTFT
            seq.arrival = arrival
        request = EngineRequest(
            seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        )
        request.adapter_ref = adapter
        if params.constraint is not None:
            request.guide = self.grammars.start(params.constraint)
        if params.n > 1:  # forked once its prompt is prefilled (forking.py)
            seq.forks, request.family_id = params.n - 1, seq.seq_id
            request.fork_generators = fork_generators(params)
            self._families[seq.seq_id] = [request]
        self._requests[seq.seq_id] = request
        self.scheduler.add(seq)
        return request

    def abort(self, seq_id: int) -> None:
        """Abort a request (every choice of it, for n > 1: they share the parent's id)."""
        family = self._families.get(seq_id)
        members = list(family) if family is not None else [self._requests.get(seq_id)]
        for request in members:
            if request is not None:
                self._finish(request, FinishReason.ABORTED)

    def _adapter_ready(self, seq: Sequence) -> bool:
        return seq.adapter_key is None or self._requests[seq.seq_id].adapter is not None

    def _may_reuse_prefix(self, seq: Sequence) -> bool:
        """Whether a sequence may start from cached prefix blocks: not when it asks for prompt logprobs
        (a cached position is not scored again), nor with an eagle draft layer, whose draft cache is
        built from the hidden states of a prefill over the whole prompt."""
        return self.config.enable_prefix_caching and self._prefills_in_parts(seq)

    def _prefills_in_parts(self, seq: Sequence) -> bool:
        """Whether the sequence's prompt may be prefilled in parts (a cached prefix, chunks)."""
        if seq.params.prompt_logprobs is not None:
            return False
        adapter = self._requests[seq.seq_id].adapter
        return adapter is None or not isinstance(adapter.speculator, EagleDraft)

    def _poll_adapters(self) -> None:
        """Hand finished loads to their waiting sequences; fail those whose adapter failed to load."""
        for seq in list(self.scheduler.waiting):
            request = self._requests[seq.seq_id]
            if request.adapter_ref is None or request.adapter is not None:
                continue
            state = self.adapters.state(request.adapter_ref)
            if isinstance(state, ServingError):
                self.metrics.requests.labels(finish_reason="error").inc()
                request.send(state)
                self._forget(request)
            elif state is not None and seq.adapter_key is not None:
                request.adapter = state
                self.adapters.pin(seq.adapter_key)

    # --- one step ------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        self._poll_adapters()
        return self.scheduler.has_work or self.embedder.has_work

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests) or self.embedder.has_unfinished

    def step(self) -> int:
        """Run one prefill or decode step; returns how many tokens it generated (0 if idle)."""
        self.embedder.step()
        self._poll_adapters()
        seqs, is_prefill = self.scheduler.schedule()
        self._update_gauges()
        if not seqs:
            return 0
        requests = [self._requests[seq.seq_id] for seq in seqs]
        drafts = [[] for _ in seqs] if is_prefill else [self.drafter.to_verify(r) for r in requests]
        if is_prefill:  # a chunked step's decoding requests verify none: their next drafts come after it
            for request in requests:
                request.drafts, request.draft_probs = [], None
        ends = self.scheduler.step_ends or [len(seq) for seq in seqs]
        if is_prefill:  # a chunked step's decoding sequences (one token each) are no prompt tokens
            fed = [end - s.num_cached for s, end in zip(seqs, ends, strict=True)]
            decoding = [bool(s.output_token_ids) and n == 1 for s, n in zip(seqs, fed, strict=True)]
            self.metrics.prompt_tokens.inc(sum(n for n, d in zip(fed, decoding, strict=True) if not d))
        outcome = self.computer.compute(requests, drafts, is_prefill, self.scheduler.step_ends)
        for i in outcome.ran:  # their K/V are written: full blocks become reusable prefixes
            self.blocks.register(requests[i].seq, ends[i])
            if ends[i] < len(requests[i].seq):  # a prefill chunk: its next chunk starts here
                requests[i].seq.num_cached = ends[i]
        now = time.monotonic()
        generated = 0
        for position, (i, tokens) in enumerate(zip(outcome.ran, outcome.emitted, strict=True)):
            try:
                if requests[i].fork_firsts:  # before the parent's token, which could free their blocks
                    generated += self._spawn_forks(requests[i], now, *outcome.extras(position, 0))
                for j, (token, logprob) in enumerate(tokens):
                    generated += 1
                    if self._emit(requests[i], token, logprob, now, *outcome.extras(position, j)):
                        break
            except ServingError as exc:  # its grammar failed on this token: this request only
                self.fail_requests([requests[i]], exc)
            except Exception:  # e.g. the detokenizer on a token it cannot decode: this request only
                log.exception("emitting a token of request %s failed", requests[i].seq.seq_id)
                self.fail_requests([requests[i]], EngineError("the engine failed while generating; retry"))
        live = [  # finished requests, and chunks that emitted nothing, propose no drafts
            requests[i] if requests[i].seq.seq_id in self._requests and tokens else None
            for i, tokens in zip(outcome.ran, outcome.emitted, strict=True)
        ]
        self.computer.propose(live, [drafts[i] for i in outcome.ran], outcome)
        self.metrics.record_step(generated)
        self._update_gauges()
        return generated

    def fail_adapters(self, requests: list[EngineRequest]) -> None:
        """Fail the requests a failure was pinned on: every request of their adapters (which are refused
        for a while, like a failed load), and those of the base model among them."""
        base = [r for r in requests if r.seq.adapter_key is None]
        if base:
            self.fail_requests(base, EngineError("the engine failed while generating; retry the request"))
        for key, ref in {r.seq.adapter_key: r.adapter_ref for r in requests if r.seq.adapter_key}.items():
            name = ref.adapter_id if ref is not None else "of this request"
            log.error("adapter %s (key %s) failed inside a step; refusing it for now", name, key)
            error = AdapterLoadError(
                f"adapter {name} failed while generating (its outputs were not finite or its weights do not "
                "fit) and is not served for now",
                field="adapter_id",
            )
            self.adapters.mark_failed(key, error)
            self.fail_requests([r for r in self._requests.values() if r.seq.adapter_key == key], error)

    def fail_requests(self, requests: list[EngineRequest], error: ServingError) -> None:
        for request in requests:
            if request.seq.seq_id in self._requests:
                if request.choice == 0:  # a request of n choices counts once
                    self.metrics.requests.labels(finish_reason="error").inc()
                request.send(error)
                self._forget(request)

    def _spawn_forks(
        self, parent: EngineRequest, now: float, top: TopLogprobs = (), prompt: PromptLogprobs | None = None
    ) -> int:
        """Make the parent's forks running requests and emit the first token each drew; returns how many.
        A fork's first token was drawn from the parent's distribution: it reports the parent's alternatives
        and scored prompt, and a constrained fork starts its own grammar from the beginning."""
        forks = make_forks(parent, self.blocks, self.runner.cache, self.tokenizer)
        for request, _, _ in forks:
            self._requests[request.seq.seq_id] = request
            self._families[parent.seq.seq_id].append(request)
            if request.adapter is not None and request.seq.adapter_key is not None:
                self.adapters.pin(request.seq.adapter_key)
            if request.seq.params.constraint is not None:
                request.guide = self.grammars.start(request.seq.params.constraint)
            self.scheduler.running.append(request.seq)
        for request, token, logprob in forks:
            self._emit(request, token, logprob, now, top, prompt)
        return len(forks)

    def _emit(
        self,
        request: EngineRequest,
        token: int,
        logprob: float,
        now: float,
        top: TopLogprobs = (),
        prompt: PromptLogprobs | None = None,
    ) -> bool:
        """Hands one token to the request (with what it asked of logprobs); True if that finished it."""
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
        # A complete grammar admits nothing but the end: the request ends now, not one step later.
        grammar_done = request.guide is not None and request.guide.advance(token)
        reason = self._finish_reason(seq, token, stop_hit)
        if reason is None and grammar_done:
            reason = FinishReason.EOS
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
                top_logprobs=top,
                prompt_logprobs=prompt,
                choice=request.choice,
            )
        )
        request.prompt_scored = request.prompt_scored or prompt is not None
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

    def _finish(self, request: EngineRequest, reason: FinishReason, *, notify: bool = True) -> None:
        seq = request.seq
        if seq.seq_id not in self._requests:
            return
        self.scheduler.finish(seq)
        if request.choice == 0:  # a request of n choices counts once
            self.metrics.requests.labels(finish_reason=reason.value).inc()
        if notify and reason is FinishReason.ABORTED:
            request.send(
                TokenOutput(
                    token_id=-1, text="", logprob=0.0, special=True, index=len(seq.output_token_ids),
                    finish_reason=reason, prompt_tokens=seq.num_prompt_tokens,
                    elapsed=time.monotonic() - seq.arrival, speculation=request.speculation,
                    choice=request.choice,
                )
            )  # fmt: skip
        self._forget(request)

    def _forget(self, request: EngineRequest) -> None:
        seq = request.seq
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq)
        if request.adapter is not None and seq.adapter_key is not None:
            self.adapters.unpin(seq.adapter_key)
            request.adapter = None
        self._requests.pop(seq.seq_id, None)
        if request.family_id is not None:
            family = self._families.get(request.family_id, [])
            if not any(member.seq.seq_id in self._requests for member in family):
                self._families.pop(request.family_id, None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_blocks_used.set(self.blocks.num_used)
        self.metrics.prefix_cached_blocks.set(self.blocks.num_cached_blocks)

    def fail_all(self, error: BaseException) -> None:
        self.embedder.fail_all(error)
        for request in list(self._requests.values()):
            request.send(error)
            self._forget(request)
