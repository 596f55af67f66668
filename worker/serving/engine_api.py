"""`ServingEngine`: what the HTTP app asks of an engine, so that one app serves tuneforge's engine or vLLM."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from worker.serving.adapters import AdapterSource, ResolvedAdapter
from worker.serving.embedding import EmbeddingResult
from worker.serving.guided import GrammarCompiler
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams


class EngineMetrics(Protocol):
    registry: CollectorRegistry  # what /metrics renders


class ServingEngine(Protocol):
    """Implemented by `AsyncEngine` (tuneforge's) and `VllmEngine`; the routes use nothing else."""

    model_name: str
    source: AdapterSource
    on_death: Callable[[], None] | None

    @property
    def metrics(self) -> EngineMetrics: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def grammars(self) -> GrammarCompiler: ...

    @property
    def ready(self) -> bool: ...

    def start(self) -> None: ...

    def begin_shutdown(self) -> None: ...

    def shutdown(self) -> None: ...

    def preload(self, adapter_ids: list[str], tenant: str | None = None) -> None: ...

    def resolve_adapter(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter: ...

    def loaded_adapters(self, tenant: str | None = None) -> list[str]: ...

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: ResolvedAdapter | None = None
    ) -> AsyncGenerator[TokenOutput, None]:
        """The outputs of `params.n` choices interleaved (`TokenOutput.choice` says whose), until each
        has finished; closing the generator aborts every choice."""
        ...

    async def embed(
        self, inputs: list[list[int]], adapter: ResolvedAdapter | None = None, *, field: str = "input"
    ) -> EmbeddingResult:
        """Pooled embeddings of token-id inputs (see embedding.py); a bad input's error names `field`."""
        ...

    async def classify(
        self, inputs: list[list[int]], adapter: ResolvedAdapter, *, field: str = "inputs"
    ) -> EmbeddingResult:
        """Label probabilities of token-id inputs from a classification adapter (`labels` names them)."""
        ...
