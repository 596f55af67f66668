"""`VllmEngine`: what tuneforge's HTTP app asks of an engine, with a vLLM child doing the generation.

Requests reach vLLM's `/v1/completions` as token ids (tuneforge tokenizes and applies chat templates, so
both engines see the same prompt), and come back one token per streamed chunk; a request of n choices
is n vLLM requests (choice j seeded seed + j, as in tuneforge's engine), whose shared prompt vLLM's
prefix cache computes once; tuneforge's own
detokenizer turns them into text, stop strings and finish reasons exactly as its engine does. An adapter
is resolved through the same `AdapterSource`, fetched, and linked into the resolver directory under a
name of the launcher's resolver (`tf-<sha1 of its key>`), which vLLM loads on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoConfig, AutoTokenizer
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ArtifactManifest

from worker.serving.adapters import AdapterSource, Resolutions, ResolvedAdapter
from worker.serving.detokenizer import IncrementalDetokenizer
from worker.serving.embedding import EmbeddingResult
from worker.serving.errors import (
    EngineError,
    NotSupportedError,
    ServingError,
    ShuttingDownError,
)
from worker.serving.guided import GrammarCompiler
from worker.serving.merging import merge
from worker.serving.outputs import FinishReason, TokenOutput
from worker.serving.params import SamplingParams, check_prompt_fits
from worker.serving.penalties import check_logit_bias_vocabulary
from worker.serving.vllm_engine.metrics import VllmMetrics
from worker.serving.vllm_engine.process import VllmConfig, VllmProcess
from worker.serving.vllm_engine.streaming import VllmStream, check_adapter_config

log = logging.getLogger(__name__)

SPECULATION_OFF = "off; engine vllm runs no tuneforge speculators"
# Adapters listed as loaded, per tenant: the most recently used this many.
MAX_LISTED_ADAPTERS = 1024


class VllmEngine:
    """The vLLM engine behind the HTTP app, with the same face as `AsyncEngine` (engine_api.ServingEngine)."""

    def __init__(
        self,
        config: VllmConfig,
        source: AdapterSource,
        *,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self._resolutions = Resolutions(source)
        self.model_name = config.model_name
        self.on_death = on_death
        self._resolver_dir = Path(tempfile.mkdtemp(prefix="tuneforge-vllm-adapters-"))
        self.process = VllmProcess(config, self._resolver_dir, self._died)
        self.metrics = VllmMetrics(self.process.url)
        self._closed: ServingError | None = None
        self._ready = False
        self._max_model_len = 0
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        self._served: OrderedDict[tuple[str | None, str], None] = OrderedDict()
        self.tokenizer: Any = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.special_ids: frozenset[int] = frozenset()
        self.vocab_size = 0
        self._grammars: GrammarCompiler | None = None

    # --- lifetime --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the tokenizer, start vLLM and wait until it serves (blocking)."""
        model_dir = self.config.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_config = AutoConfig.from_pretrained(model_dir)
        self.vocab_size = int(model_config.vocab_size)
        self.eos_token_ids = _eos_ids(model_config.eos_token_id, self.tokenizer.eos_token_id)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.process.start()
        with httpx.Client(timeout=10.0) as client:
            models = client.get(f"{self.process.url}/v1/models").raise_for_status().json()
        self._max_model_len = int(models["data"][0]["max_model_len"])
        self._ready = True
        log.info(
            "vLLM serves %s (context %d tokens); Turbo adapters are served without speculation "
            "(engine vllm runs no tuneforge speculators)",
            self.model_name,
            self._max_model_len,
        )

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def ready(self) -> bool:
        return self._ready and self._closed is None and self.process.alive

    def begin_shutdown(self) -> None:
        """Refuse new requests; those in flight end with an error once vLLM stops (`shutdown`)."""
        if self._closed is None:
            self._closed = ShuttingDownError("the server is shutting down; retry shortly")

    def shutdown(self) -> None:
        self.begin_shutdown()
        self.process.stop()
        shutil.rmtree(self._resolver_dir, ignore_errors=True)

    def _died(self, code: int) -> None:
        self._closed = ShuttingDownError("the vLLM engine stopped; the server restarts, retry shortly")
        if self.on_death is not None:
            self.on_death()

    # --- adapters --------------------------------------------------------------------------------------

    def preload(self, adapter_ids: list[str], tenant: str | None = None) -> None:
        """Fetch and link each adapter now (vLLM loads it on its first request)."""
        for adapter_id in adapter_ids:
            self._link(self.resolve_adapter(adapter_id, tenant))

    def resolve_adapter(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        """What the id names for the tenant now (remembered briefly, as tuneforge's engine does). Blocking
        (a database read): call it from a worker thread."""
        return self._resolutions.resolve(adapter_id, tenant)

    def loaded_adapters(self, tenant: str | None = None) -> list[str]:
        """Adapters this process has handed to vLLM for the tenant (vLLM keeps them in its CPU cache)."""
        with self._lock:
            return [adapter_id for (owner, adapter_id) in self._served if owner == tenant]

    def _link(self, adapter: ResolvedAdapter) -> tuple[str | None, bool]:
        """The vLLM model name serving `adapter` (None: the base) and whether it has a speculator we skip.

        Blocking (a download on first use): call it from a worker thread."""
        path = Path(self.source.fetch(adapter))
        manifest = ArtifactManifest.of_directory(path)
        with self._lock:
            self._served[(adapter.tenant, adapter.adapter_id)] = None
            self._served.move_to_end((adapter.tenant, adapter.adapter_id))
            while len(self._served) > MAX_LISTED_ADAPTERS:
                self._served.popitem(last=False)
        if manifest.is_speculator_only:
            return None, True  # a Turbo speculator alone adapts nothing: the base model answers
        check_adapter_config(adapter.adapter_id, path / ADAPTER_CONFIG, self.config.max_lora_rank)
        name = "tf-" + hashlib.sha1(adapter.key.encode()).hexdigest()
        link = self._resolver_dir / name
        if not link.exists():
            tmp = self._resolver_dir / f".{name}.{threading.get_ident()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path.resolve(), target_is_directory=True)
            tmp.replace(link)
        return name, manifest.has_speculator

    @property
    def grammars(self) -> GrammarCompiler:
        """Checks a request's constraint before it is sent (a bad schema is the same 400 as with
        tuneforge's engine); vLLM then enforces it with its own structured-output backend."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammars

    # --- requests --------------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The checks tuneforge's engine makes before a request is queued, with the same messages."""
        check_prompt_fits(prompt_token_ids, params, self.vocab_size, self.max_model_len)
        check_logit_bias_vocabulary(params, self.vocab_size)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | None = None,
    ) -> AsyncGenerator[TokenOutput, None]:
        """Tokens of one request as vLLM generates them, of its `params.n` choices interleaved (each
        `TokenOutput.choice` says whose); raises its ServingError if it fails. Leaving early closes the
        HTTP streams, which makes vLLM abort every choice."""
        if self._closed is not None:
            raise type(self._closed)(self._closed.message)
        self.validate(prompt_token_ids, params)
        arrival = time.monotonic()
        model, note = self.model_name, None
        if adapter is not None:
            linked, skipped_speculator = await asyncio.to_thread(self._link, adapter)
            model = linked or self.model_name
            note = SPECULATION_OFF if skipped_speculator else None
        choices = [
            self._choice(
                model, prompt_token_ids, replace(params, n=1, seed=params.choice_seed(j)), adapter, j
            )
            for j in range(params.n)
        ]
        async with aclosing(merge(choices)) as outputs:  # leaving closes every choice's stream
            async for output in outputs:
                yield replace(output, elapsed=time.monotonic() - arrival, speculation_note=note)

    async def _choice(
        self,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: ResolvedAdapter | None,
        choice: int,
    ) -> AsyncGenerator[TokenOutput, None]:
        """One choice: one streamed vLLM request."""
        body = self._body(model, prompt_token_ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop)
        stream = VllmStream(
            self._http(),
            f"{self.process.url}/v1/completions",
            body,
            top_k=params.logprobs,
            prompt_k=params.prompt_logprobs,
        )
        index = 0
        try:
            async for token, logprob, vllm_reason, top, prompt in stream.tokens(adapter):
                if self._closed is not None:  # shutting down: end now, not at the stream's last token
                    raise type(self._closed)(self._closed.message)
                text, stop_hit = detok.add(token)
                reason = self._finish_reason(token, index, params, stop_hit, vllm_reason)
                if reason is not None and reason is not FinishReason.STOP_SEQUENCE:
                    text += detok.flush()
                if reason is not None and choice == 0:  # a request of n choices counts once
                    self.metrics.requests.labels(finish_reason=reason.value).inc()
                yield TokenOutput(
                    token_id=token, text=text, logprob=logprob, special=token in self.special_ids,
                    index=index, finish_reason=reason, prompt_tokens=len(prompt_token_ids), choice=choice,
                    top_logprobs=top, prompt_logprobs=prompt,
                )  # fmt: skip
                if reason is not None:
                    return  # a stop string: closing the stream aborts the request in vLLM
                index += 1
        except (GeneratorExit, asyncio.CancelledError):  # the client left: the request is aborted
            if choice == 0:
                self.metrics.requests.labels(finish_reason=FinishReason.ABORTED.value).inc()
            raise
        except httpx.HTTPError as exc:
            if self._closed is not None:
                raise type(self._closed)(self._closed.message) from None
            log.warning("the request to vLLM failed: %r", exc)
            raise EngineError("the vLLM engine failed while generating; retry the request") from None
        finally:
            await stream.aclose()
        raise EngineError("the vLLM engine ended the request without a finish reason; retry it")

    async def embed(
        self, inputs: list[list[int]], adapter: ResolvedAdapter | None = None, *, field: str = "input"
    ) -> EmbeddingResult:
        """Refused: vLLM serves this model as a generator (its completions API), which gives no hidden
        states; vLLM embeds only models it was started to pool, one task per process."""
        raise NotSupportedError(
            f"embeddings are not served by this deployment's engine, vllm (it serves {self.model_name} "
            "for generation only): create a deployment of the model with config.engine 'tuneforge', "
            "whose engine serves embeddings of the base model and of its adapters"
        )

    async def classify(
        self, inputs: list[list[int]], adapter: ResolvedAdapter, *, field: str = "inputs"
    ) -> EmbeddingResult:
        """Refused: a classification adapter's head runs on hidden states, which vLLM's completions API
        does not give."""
        raise NotSupportedError(
            "classification adapters are served by engine tuneforge, not by this deployment's engine, vllm: "
            f"create a deployment of {self.model_name} with config.engine 'tuneforge'"
        )

    def _finish_reason(
        self, token: int, index: int, params: SamplingParams, stop_hit: bool, vllm_reason: str | None
    ) -> FinishReason | None:
        """As tuneforge's engine decides (stop string, then EOS, then length); vLLM's own reason last."""
        if stop_hit:
            return FinishReason.STOP_SEQUENCE
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.EOS
        if index + 1 >= params.max_tokens:
            return FinishReason.LENGTH
        if vllm_reason is not None:
            return FinishReason.LENGTH if vllm_reason == "length" else FinishReason.EOS
        return None

    def _body(self, model: str, prompt_token_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body = self._sampling_body(model, prompt_token_ids, params)
        if params.cache_scope is not None:  # vLLM's prefix cache, like ours, is shared within a tenant only
            body["cache_salt"] = hashlib.sha256(params.cache_scope.encode()).hexdigest()
        constraint = params.constraint
        if constraint is not None:  # vLLM >= 0.12 names its guided decoding `structured_outputs`
            body["structured_outputs"] = (
                {"json": constraint.schema} if constraint.kind == "json" else {"regex": constraint.spec}
            )
        return body

    def _sampling_body(
        self, model: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": list(prompt_token_ids),
            "max_tokens": params.max_tokens,
            "stream": True,
            "return_token_ids": True,
            # The sampled token's own logprob (vLLM's raw one, as tuneforge's engine reports it) and the
            # alternatives asked for, as `token_id:<id>` strings; a scored prompt comes with `echo`
            # (its entries first; with return_token_ids the text stays the completion's alone).
            "logprobs": max(params.logprobs, params.prompt_logprobs or 0),
            "return_tokens_as_token_ids": True,
            "echo": params.prompt_logprobs is not None,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,
            "repetition_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "logit_bias": {str(token): bias for token, bias in params.logit_bias} or None,
            "seed": params.seed,
            "ignore_eos": params.ignore_eos,
            # tuneforge's EOS set (config and tokenizer); stop strings are matched here, on tuneforge's text
            "stop_token_ids": [] if params.ignore_eos else sorted(self.eos_token_ids),
        }

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the server's event loop, where every request runs
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(10.0, read=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client


def _eos_ids(*sources: object) -> frozenset[int]:
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)
