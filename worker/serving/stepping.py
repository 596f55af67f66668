"""One engine step's computation: the forward pass, each request's tokens and the next drafts, with a
failure pinned on the adapter behind it.

`LLMEngine.step()` schedules, then asks `StepComputer.compute` for what each request emits, emits it,
and asks `StepComputer.propose` for the next drafts. Whatever goes wrong in between is one adapter's
doing until shown otherwise: non-finite logits name their rows' requests; an exception is traced by
running each adapter's requests alone (the base model's are one more group). The requests of an adapter
that fails are failed (and the adapter refused, by the engine), and the step runs again without them.
Running a step again is safe: each position's K/V are written with the same values every time, and
nothing is drawn from a generator or emitted before a step succeeds.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from worker.serving import speculator as speculative
from worker.serving.drafting import Drafter, row_starts
from worker.serving.errors import EngineError, ServingError
from worker.serving.lora import AdapterWeights
from worker.serving.model_runner import ModelRunner
from worker.serving.sampling import sample_next_tokens
from worker.serving.sequence import SequenceStatus

if TYPE_CHECKING:
    from worker.serving.engine import _Request

log = logging.getLogger(__name__)

Emitted = list[list[tuple[int, float]]]  # per request, the (token, logprob) pairs a step emits


class BadRows(Exception):
    """Some requests' logits are not finite; `rows` are their indices in the step."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"non-finite logits for requests {rows}")
        self.rows = rows


class Failures(Protocol):
    """How the engine fails requests (it owns them): an adapter's, or a given list with an error."""

    def fail_adapters(self, requests: list[_Request]) -> None: ...

    def fail_requests(self, requests: list[_Request], error: ServingError) -> None: ...


def check_rows_finite(logits: torch.Tensor, starts: list[int]) -> None:
    """BadRows naming the requests (each owning rows starts[i]:starts[i + 1]) with a non-finite logit."""
    # One pass: a row's sum is finite exactly when every logit is (logits are nowhere near overflow).
    finite = logits.sum(dim=-1).isfinite()  # [rows]
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    raise BadRows(sorted({bisect.bisect_right(starts, row) - 1 for row in bad}))


def adapter_groups(requests: Sequence[_Request | None]) -> list[list[int]]:
    """Indices of the requests (None skipped), grouped by adapter; the base model's form one group."""
    groups: dict[str | None, list[int]] = {}
    for i, request in enumerate(requests):
        if request is not None:
            groups.setdefault(request.seq.adapter_key, []).append(i)
    return list(groups.values())


def _alive(request: _Request) -> bool:
    return request.seq.status is not SequenceStatus.FINISHED


class StepComputer:
    """Forward pass, token choice and drafting of one step, for the engine that owns the requests."""

    def __init__(self, runner: ModelRunner, drafter: Drafter, failures: Failures) -> None:
        self.runner = runner
        self.drafter = drafter
        self.failures = failures

    def compute(
        self, requests: list[_Request], drafts: list[list[int]], is_prefill: bool
    ) -> tuple[list[int], Emitted, list[int] | None]:
        """(indices of the requests computed, what each emits, their prefill lengths); the requests a
        failure was pinned on are failed and left out."""
        indices = list(range(len(requests)))
        while indices:
            chosen, chosen_drafts = [requests[i] for i in indices], [drafts[i] for i in indices]
            try:
                logits, prefill_lengths = self._forward(chosen, chosen_drafts, is_prefill)
                return indices, self._choose_tokens(chosen, logits, chosen_drafts), prefill_lengths
            except BadRows as bad:
                culprits = {indices[row] for row in bad.rows}
            except Exception:
                log.exception("a step of %d requests failed; looking for the adapter behind it", len(indices))
                culprits = self._probe(requests, drafts, indices, is_prefill)
            if not culprits:  # every group runs alone: no one adapter's doing, so no result can be trusted
                self.failures.fail_requests(chosen, EngineError("the engine failed while generating; retry"))
                return [], [], None
            self.failures.fail_adapters([requests[i] for i in culprits])
            indices = [i for i in indices if _alive(requests[i])]
        return [], [], None

    def propose(
        self,
        live: list[_Request | None],
        drafts: list[list[int]],
        emitted: Emitted,
        prefill_lengths: list[int] | None,
    ) -> None:
        """Next step's drafts; a speculator that fails does so for its own adapter's requests only."""
        try:
            self.drafter.propose(live, drafts, emitted, prefill_lengths)
            return
        except Exception:
            log.exception("drafting failed; drafting again one adapter at a time")
        for request in live:
            if request is not None:  # what the failed pass proposed or committed is not to be trusted
                request.drafts, request.draft_probs, request.draft_state = [], None, None
        for group in adapter_groups(live):
            only: list[_Request | None] = [live[i] if i in group else None for i in range(len(live))]
            try:
                self.drafter.propose(only, drafts, emitted, prefill_lengths)
            except Exception:
                log.exception("drafting failed for one adapter's requests")
                self.failures.fail_adapters([r for r in only if r is not None])

    def _forward(
        self, requests: list[_Request], drafts: list[list[int]], is_prefill: bool
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Logits of the requests' rows (on the CPU, where sampling runs); BadRows if some are not finite."""
        seqs = [r.seq for r in requests]
        adapters, owner = _active_adapters(requests)
        if is_prefill:
            step = self.runner.prefill_input(seqs, adapters, owner)
        else:
            step = self.runner.decode_input(seqs, adapters, owner, drafts if any(drafts) else None)
        logits = self.runner.forward(step).cpu()
        check_rows_finite(logits, row_starts(drafts))
        return logits, step.prefill_lengths

    def _probe(
        self, requests: list[_Request], drafts: list[list[int]], indices: list[int], is_prefill: bool
    ) -> set[int]:
        """The requests of every adapter whose requests fail a forward pass on their own."""
        culprits: set[int] = set()
        for group in adapter_groups([requests[i] for i in indices]):
            members = [indices[g] for g in group]
            try:
                self._forward([requests[i] for i in members], [drafts[i] for i in members], is_prefill)
            except Exception:
                culprits.update(members)
        return culprits

    def _choose_tokens(
        self, requests: list[_Request], logits: torch.Tensor, drafts: list[list[int]]
    ) -> Emitted:
        """Per request the (token, logprob) pairs this step emits: one sampled, or the verified drafts."""
        starts = row_starts(drafts)
        chosen: Emitted = [[] for _ in requests]
        plain = [i for i, r in enumerate(requests) if not speculative.speculates(r.seq.params, r.adapter)]
        if plain:
            seqs = [requests[i].seq for i in plain]
            needs_history = any(s.params.repetition_penalty != 1.0 for s in seqs)
            histories: list[torch.Tensor | list[int]] = (
                [torch.tensor(s.all_token_ids) for s in seqs] if needs_history else [[] for _ in seqs]
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


def _active_adapters(requests: list[_Request]) -> tuple[list[AdapterWeights], list[int]]:
    """The step's distinct adapters, and for each request its index among them (-1: the base model)."""
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
