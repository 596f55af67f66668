"""Embeddings inside the engine loop: each request's inputs pooled from the base model's (or its adapter's)
final hidden states; and classification, the same pass pooled at the last token into a classification
adapter's head (classifier.py).

Pooling: the mean over an input's tokens of the final-norm hidden states (what the LM head reads), in
float32, then L2-normalised; so the dot product of two embeddings is their cosine similarity.

An embedding request is work of its own kind. Its job queues here; between two generation steps the
engine runs one pass over as many queued inputs as fit `max_batch_tokens` (a longer single input runs
alone), several requests and adapters mixed in one pass as a prefill mixes them (per-token LoRA). The
pass writes nothing to the KV cache (each input attends within itself), so it takes no blocks from
generation, and a stream of embedding requests costs a generation step at most one such pass.

A pass that raises runs again one request at a time, and only the requests that fail alone fail; an
input whose vector is not finite fails its request only.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from worker.serving.adapters import AdapterCache, ResolvedAdapter
from worker.serving.errors import (
    EngineError,
    EngineOverloadedError,
    InvalidParameterError,
    NotSupportedError,
    PromptTooLongError,
    ServingError,
)
from worker.serving.lora import AdapterWeights
from worker.serving.model_runner import ModelRunner
from worker.serving.params import MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TOKENS
from worker.serving.step_input import StepInput

log = logging.getLogger(__name__)

# Tokens queued for embedding at most, all requests together (a request alone may hold up to
# MAX_EMBEDDING_TOKENS): beyond it a request is refused with 503, so the queue's memory stays bounded.
MAX_QUEUED_EMBEDDING_TOKENS = 1 << 21


@dataclass(frozen=True)
class EmbeddingResult:
    """One request's embeddings, in the order of its inputs."""

    vectors: torch.Tensor  # [N, D] float32 on the CPU, unit L2 norm per row; [N, labels] probabilities
    prompt_tokens: int
    labels: tuple[str, ...] | None = None  # a classification's class names (vectors' columns)


Deliver = Callable[[EmbeddingResult | ServingError], None]


@dataclass(eq=False)
class EmbeddingJob:
    """One request's inputs on their way through the engine; `deliver` is called once (engine thread)."""

    inputs: list[list[int]]
    adapter_ref: ResolvedAdapter | None
    deliver: Deliver
    cancelled: bool = False  # set by the caller that stopped waiting; the engine drops the job
    key: str | None = None  # the adapter cache's key, once requested
    adapter: AdapterWeights | None = None  # pinned while the job is queued
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # done so far, by input index
    next_input: int = 0  # the first input no pass has taken yet
    classify: bool = False  # pool the last token into the adapter's classification head instead

    @property
    def num_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


def check_inputs(inputs: list[list[int]], *, vocab_size: int, max_model_len: int, field: str) -> None:
    """What fails a request before it is queued; the 4xx names `field` (the route's name for the inputs)."""
    if not inputs:
        raise InvalidParameterError(f"{field} must hold at least one input", field=field)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidParameterError(
            f"{field} holds {len(inputs)} inputs; at most {MAX_EMBEDDING_INPUTS} are embedded per request",
            field=field,
        )
    total = 0
    for i, tokens in enumerate(inputs):
        where = f"{field}[{i}]" if len(inputs) > 1 else field
        if not tokens:
            raise InvalidParameterError(
                f"{where} is empty; every input needs at least one token", field=field
            )
        if min(tokens) < 0 or max(tokens) >= vocab_size:
            raise InvalidParameterError(f"{where}: token ids must be in [0, {vocab_size})", field=field)
        if len(tokens) > max_model_len:
            raise PromptTooLongError(
                f"{where} has {len(tokens)} tokens; this model's context is {max_model_len}: shorten it",
                field=field,
            )
        total += len(tokens)
    if total > MAX_EMBEDDING_TOKENS:
        raise InvalidParameterError(
            f"{field} holds {total} tokens in all; at most {MAX_EMBEDDING_TOKENS} are embedded per request: "
            "split it into several requests",
            field=field,
        )


def not_a_classifier(adapter_id: str) -> NotSupportedError:
    return NotSupportedError(
        f"adapter {adapter_id} is not a classification adapter: /classify serves adapters trained with "
        "task 'classification'; generate text with it through /generate instead",
        field="adapter_id",
    )


def mean_pool(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """`[T, D]` hidden states of inputs laid end to end → `[N, D]` float32 unit vectors, one per input.
    Per-input means (not a scatter-add), so a row's value never depends on atomics' order on a GPU."""
    means = torch.stack([part.float().mean(0) for part in hidden.split(lengths)])
    return F.normalize(means, p=2.0, dim=-1)


def embedding_input(
    inputs: list[list[int]], adapters: list[AdapterWeights], owner: list[int], device: torch.device
) -> StepInput:
    """A prefill-shaped pass over the inputs that writes no cache (`slot_mapping` None)."""
    lengths = [len(tokens) for tokens in inputs]
    ids = torch.tensor([t for tokens in inputs for t in tokens])
    positions = torch.cat([torch.arange(n) for n in lengths])
    token_adapter = torch.repeat_interleave(torch.tensor(owner), torch.tensor(lengths))
    last = torch.tensor(lengths).cumsum(0) - 1
    return StepInput(
        input_ids=ids.to(device),
        positions=positions.to(device),
        slot_mapping=None,
        token_adapter=token_adapter.to(device),
        adapters=adapters,
        logits_indices=last.to(device),
        prefill_lengths=lengths,
    )


@dataclass(frozen=True)
class _Piece:
    job: EmbeddingJob
    index: int  # which of the job's inputs

    @property
    def tokens(self) -> list[int]:
        return self.job.inputs[self.index]


class Embedder:
    """Queued embedding jobs of one engine, run in token-bounded passes between generation steps."""

    def __init__(
        self, runner: ModelRunner, adapters: AdapterCache, *, max_batch_tokens: int, max_waiting: int
    ) -> None:
        self.runner = runner
        self.adapters = adapters
        self.max_batch_tokens = max_batch_tokens
        self.max_waiting = max_waiting
        self.jobs: deque[EmbeddingJob] = deque()
        self.queued_tokens = 0

    def check(self, inputs: list[list[int]], field: str) -> None:
        """The request's bounds, and room in the queue (read from the caller's thread: a fast refusal)."""
        runner = self.runner
        check_inputs(inputs, vocab_size=runner.vocab_size, max_model_len=runner.max_model_len, field=field)
        self._check_room(sum(len(tokens) for tokens in inputs))

    def admit(self, job: EmbeddingJob) -> None:
        """Queue the job (engine thread); a job that cannot be queued gets its error, nothing else does."""
        try:
            self._check_room(job.num_tokens)
            if job.adapter_ref is not None:
                job.key = self.adapters.request(job.adapter_ref)
        except ServingError as exc:
            job.deliver(exc)
            return
        except Exception:
            log.exception("admitting an embedding request failed")
            job.deliver(EngineError("the embedding request could not be admitted; retry"))
            return
        self.jobs.append(job)
        self.queued_tokens += job.num_tokens

    @property
    def has_work(self) -> bool:
        """Some job can run now (jobs whose adapter still loads wait without holding the loop awake)."""
        self._poll()
        return any(self._ready(job) for job in self.jobs)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.jobs)

    def step(self) -> int:
        """One pass over the next queued inputs; returns how many inputs it embedded."""
        self._poll()
        pieces = self._take()
        if not pieces:
            return 0
        try:
            self._store(pieces, self._embed(pieces))
        except Exception:
            log.exception(
                "an embedding pass of %d inputs failed; running its requests one at a time", len(pieces)
            )
            self._run_alone(pieces)
        return len(pieces)

    def fail_all(self, error: BaseException) -> None:
        for job in list(self.jobs):
            if isinstance(error, ServingError):  # a copy per request: one instance raised in many tasks
                self._finish(job, type(error)(error.message, field=error.field))
            else:
                self._finish(job, EngineError("the engine stopped while embedding; retry the request"))

    # --- inside --------------------------------------------------------------------------------------

    def _check_room(self, tokens: int) -> None:
        over_tokens = self.jobs and self.queued_tokens + tokens > MAX_QUEUED_EMBEDDING_TOKENS
        if len(self.jobs) >= self.max_waiting or over_tokens:
            raise EngineOverloadedError(
                f"{len(self.jobs)} embedding requests ({self.queued_tokens} tokens) wait; retry shortly"
            )

    def _ready(self, job: EmbeddingJob) -> bool:
        return job.adapter_ref is None or job.adapter is not None

    def _poll(self) -> None:
        """Drop abandoned jobs; pin adapters that finished loading; fail jobs whose adapter failed."""
        for job in list(self.jobs):
            if job.cancelled:
                self._forget(job)
            elif job.adapter_ref is not None and job.adapter is None:
                state = self.adapters.state(job.adapter_ref)
                if isinstance(state, ServingError):
                    self._finish(job, type(state)(state.message, field=state.field))
                elif state is not None and job.classify and state.classifier is None:
                    self._finish(job, not_a_classifier(job.adapter_ref.adapter_id))
                elif state is not None and job.key is not None:
                    job.adapter = state
                    self.adapters.pin(job.key)

    def _take(self) -> list[_Piece]:
        """The next inputs in arrival order within the token budget (the first whatever its length)."""
        pieces: list[_Piece] = []
        budget = self.max_batch_tokens
        for job in self.jobs:
            if not self._ready(job):
                continue
            while job.next_input < len(job.inputs):
                length = len(job.inputs[job.next_input])
                if pieces and length > budget:
                    return pieces
                pieces.append(_Piece(job, job.next_input))
                job.next_input += 1
                budget -= length
        return pieces

    def _embed(self, pieces: list[_Piece]) -> list[torch.Tensor]:
        """Per piece, on the CPU: the unit vector of its input (with its own job's adapter), or for a
        classification job its label probabilities."""
        adapters: list[AdapterWeights] = []
        position: dict[str, int] = {}
        owner: list[int] = []
        for piece in pieces:
            weights = piece.job.adapter
            if weights is None:
                owner.append(-1)
                continue
            if weights.key not in position:
                position[weights.key] = len(adapters)
                adapters.append(weights)
            owner.append(position[weights.key])
        step = embedding_input([p.tokens for p in pieces], adapters, owner, self.runner.device)
        hidden = self.runner.hidden_states(step)  # [T, D]
        assert step.prefill_lengths is not None
        rows: list[torch.Tensor] = []
        for i, (piece, part) in enumerate(zip(pieces, hidden.split(step.prefill_lengths), strict=True)):
            head = piece.job.adapter.classifier if piece.job.adapter is not None else None
            if piece.job.classify and head is not None:
                rows.append(head.probabilities(part[-1:])[0].cpu())  # the last token, as training pools
            else:
                rows.append(mean_pool(part, [step.prefill_lengths[i]])[0].cpu())
        return rows

    def _store(self, pieces: list[_Piece], vectors: list[torch.Tensor]) -> None:
        finite = [bool(row.isfinite().all()) for row in vectors]
        for piece, row, ok in zip(pieces, vectors, finite, strict=True):
            job = piece.job
            if job not in self.jobs:
                continue  # failed by an earlier piece of this pass
            if not ok:
                name = f"adapter {job.adapter_ref.adapter_id}" if job.adapter_ref is not None else "the model"
                self._finish(job, EngineError(f"{name} gave a non-finite embedding for input {piece.index}"))
                continue
            job.vectors[piece.index] = row
            if len(job.vectors) == len(job.inputs):
                vectors_in_order = torch.stack([job.vectors[i] for i in range(len(job.inputs))])
                head = job.adapter.classifier if job.classify and job.adapter is not None else None
                labels = head.labels if head is not None else None
                result = EmbeddingResult(vectors_in_order, sum(len(t) for t in job.inputs), labels)
                self._finish(job, result)

    def _run_alone(self, pieces: list[_Piece]) -> None:
        """Each job's pieces of a failed pass on their own: the jobs that fail alone fail, the rest go on."""
        by_job: dict[int, list[_Piece]] = {}
        for piece in pieces:
            by_job.setdefault(id(piece.job), []).append(piece)
        for own in by_job.values():
            try:
                self._store(own, self._embed(own))
            except Exception:
                log.exception("an embedding request failed on its own")
                self._finish(own[0].job, EngineError("the engine failed while embedding; retry the request"))

    def _finish(self, job: EmbeddingJob, outcome: EmbeddingResult | ServingError) -> None:
        self._forget(job)
        try:
            job.deliver(outcome)
        except Exception:  # a caller's delivery must not stop the loop
            log.exception("delivering an embedding result failed")

    def _forget(self, job: EmbeddingJob) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
            self.queued_tokens -= job.num_tokens
        if job.adapter is not None and job.key is not None:
            self.adapters.unpin(job.key)
            job.adapter = None
