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
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.serving.drafting import Drafter, row_starts, speculates
from worker.serving.errors import EngineError, ServingError
from worker.serving.guided import allowed_tokens
from worker.serving.logprobs import non_finite, step_prompt_logprobs, step_top_logprobs
from worker.serving.lora import AdapterWeights
from worker.serving.model_runner import ModelRunner, StepHidden
from worker.serving.outputs import PromptLogprobs, TopLogprobs
from worker.serving.request import EngineRequest
from worker.serving.sampling import sample_next_tokens
from worker.serving.sequence import Sequence as SequenceState
from worker.serving.sequence import SequenceStatus
from worker.serving.step_input import decode_input, prefill_input

log = logging.getLogger(__name__)

Emitted = list[list[tuple[int, float]]]  # per request, the (token, logprob) pairs a step emits


@dataclass(frozen=True)
class StepOutcome:
    """What a step computed: which requests ran, what each emits, and what drafting reads next."""

    ran: list[int]  # indices of the requests computed
    emitted: Emitted  # per request in `ran`
    prefill_lengths: list[int] | None = None  # a prefill step's tokens per request in `ran`
    hidden: StepHidden | None = None  # None when no request ran
    # Only when some request asked (logprobs.py): per request in `ran`, each emitted token's
    # alternatives, and a prefill's scored prompts.
    top_logprobs: list[list[TopLogprobs]] | None = None
    prompt_logprobs: list[PromptLogprobs | None] | None = None

    def extras(self, position: int, token: int) -> tuple[TopLogprobs, PromptLogprobs | None]:
        """The alternatives of the `token`-th token emitted by request `ran[position]`, and with its first
        token, its scored prompt."""
        tops = self.top_logprobs[position] if self.top_logprobs else []  # [] when this request asks none
        top = tops[token] if token < len(tops) else ()
        prompt = self.prompt_logprobs[position] if self.prompt_logprobs and token == 0 else None
        return top, prompt


class BadRows(Exception):
    """Some requests' logits are not finite; `rows` are their indices in the step."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"non-finite logits for requests {rows}")
        self.rows = rows


class Failures(Protocol):
    """How the engine fails requests (it owns them): an adapter's, or a given list with an error."""

    def fail_adapters(self, requests: list[EngineRequest]) -> None: ...

    def fail_requests(self, requests: list[EngineRequest], error: ServingError) -> None: ...


def check_rows_finite(logits: torch.Tensor, starts: list[int]) -> None:
    """BadRows naming the requests (each owning rows starts[i]:starts[i + 1]) with a non-finite logit."""
    # One pass: a row's sum is finite exactly when every logit is (logits are nowhere near overflow).
    finite = logits.sum(dim=-1).isfinite()  # [rows]
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    raise BadRows(sorted({bisect.bisect_right(starts, row) - 1 for row in bad}))


def adapter_groups(requests: Sequence[EngineRequest | None]) -> list[list[int]]:
    """Indices of the requests (None skipped), grouped by adapter; the base model's form one group."""
    groups: dict[str | None, list[int]] = {}
    for i, request in enumerate(requests):
        if request is not None:
            groups.setdefault(request.seq.adapter_key, []).append(i)
    return list(groups.values())


def _alive(request: EngineRequest) -> bool:
    return request.seq.status is not SequenceStatus.FINISHED


class StepComputer:
    """Forward pass, token choice and drafting of one step, for the engine that owns the requests."""

    def __init__(self, runner: ModelRunner, drafter: Drafter, failures: Failures) -> None:
        self.runner = runner
        self.drafter = drafter
        self.failures = failures

    def compute(
        self,
        requests: list[EngineRequest],
        drafts: list[list[int]],
        is_prefill: bool,
        ends: list[int] | None = None,
    ) -> StepOutcome:
        """What the requests emit; the requests a failure was pinned on are failed and left out.
        `ends`: a chunked step's end of each request's feed; one short of its sequence emits nothing."""
        indices = list(range(len(requests)))
        while indices:
            chosen, chosen_drafts = [requests[i] for i in indices], [drafts[i] for i in indices]
            chosen_ends = [ends[i] for i in indices] if ends is not None else None
            try:
                logits, hidden, prefill_lengths = self._forward(
                    chosen, chosen_drafts, is_prefill, chosen_ends
                )
                emitted = self._choose_completed(chosen, logits, chosen_drafts, chosen_ends)
                tops = step_top_logprobs(chosen, logits, row_starts(chosen_drafts), emitted)
                prompts = (
                    step_prompt_logprobs(chosen, hidden.tokens, prefill_lengths, self.runner.logits)
                    if prefill_lengths
                    else None
                )
                if prompts and (unscorable := non_finite(prompts)):
                    raise BadRows(unscorable)
                return StepOutcome(indices, emitted, prefill_lengths, hidden, tops, prompts)
            except BadRows as bad:
                culprits = {indices[row] for row in bad.rows}
            except Exception:
                log.exception("a step of %d requests failed; looking for the adapter behind it", len(indices))
                culprits = self._probe(requests, drafts, indices, is_prefill, ends)
            if not culprits:  # every group runs alone: no one adapter's doing, so no result can be trusted
                self.failures.fail_requests(chosen, EngineError("the engine failed while generating; retry"))
                return StepOutcome([], [])
            self.failures.fail_adapters([requests[i] for i in culprits])
            indices = [i for i in indices if _alive(requests[i])]
        return StepOutcome([], [])

    def propose(
        self, live: list[EngineRequest | None], drafts: list[list[int]], outcome: StepOutcome
    ) -> None:
        """Next step's drafts (`live`: the step's requests in `outcome.ran` order, None for a finished
        one); a speculator that fails does so for its own adapter's requests only."""
        if outcome.hidden is None:
            return
        emitted, hidden, prefill_lengths = outcome.emitted, outcome.hidden, outcome.prefill_lengths
        try:
            self.drafter.propose(live, drafts, emitted, hidden, prefill_lengths)
            return
        except Exception:
            log.exception("drafting failed; drafting again one adapter at a time")
        for request in live:
            if request is not None:  # what the failed pass proposed or committed is not to be trusted
                request.drafts, request.draft_probs, request.draft_state = [], None, None
        for group in adapter_groups(live):
            only: list[EngineRequest | None] = [live[i] if i in group else None for i in range(len(live))]
            try:
                self.drafter.propose(only, drafts, emitted, hidden, prefill_lengths)
            except Exception:
                log.exception("drafting failed for one adapter's requests")
                self.failures.fail_adapters([r for r in only if r is not None])

    def _forward(
        self,
        requests: list[EngineRequest],
        drafts: list[list[int]],
        is_prefill: bool,
        ends: list[int] | None = None,
    ) -> tuple[torch.Tensor, StepHidden, list[int] | None]:
        """Logits of the requests' rows (on the CPU, where sampling runs) and the pass's hidden states;
        BadRows if some logits are not finite."""
        seqs = [r.seq for r in requests]
        adapters, owner = _active_adapters(requests)
        if is_prefill:
            step = prefill_input(seqs, adapters, owner, self.runner.device, ends)
        else:
            step = decode_input(seqs, adapters, owner, self.runner.device, drafts if any(drafts) else None)
        result = self.runner.forward(step)
        logits = result.logits.cpu()
        check_rows_finite(logits, row_starts(drafts))
        return logits, result.hidden, step.prefill_lengths

    def _probe(
        self,
        requests: list[EngineRequest],
        drafts: list[list[int]],
        indices: list[int],
        is_prefill: bool,
        ends: list[int] | None,
    ) -> set[int]:
        """The requests of every adapter whose requests fail a forward pass on their own."""
        culprits: set[int] = set()
        for group in adapter_groups([requests[i] for i in indices]):
            members = [indices[g] for g in group]
            try:
                self._forward(
                    [requests[i] for i in members],
                    [drafts[i] for i in members],
                    is_prefill,
                    [ends[i] for i in members] if ends is not None else None,
                )
            except Exception:
                culprits.update(members)
        return culprits

    def _choose_completed(
        self,
        requests: list[EngineRequest],
        logits: torch.Tensor,
        drafts: list[list[int]],
        ends: list[int] | None,
    ) -> Emitted:
        """`_choose_tokens` for the requests whose feed reaches the end of their sequence; a prefill chunk
        short of it emits nothing (and draws nothing from its generator). A chunked step has no drafts:
        request k's logits are row k."""
        if ends is None:
            return self._choose_tokens(requests, logits, drafts)
        done = [k for k, (r, end) in enumerate(zip(requests, ends, strict=True)) if end == len(r.seq)]
        emitted: Emitted = [[] for _ in requests]
        if done:
            chosen = self._choose_tokens(
                [requests[k] for k in done], logits[torch.tensor(done)], [drafts[k] for k in done]
            )
            for k, tokens in zip(done, chosen, strict=True):
                emitted[k] = tokens
        return emitted

    def _choose_tokens(
        self, requests: list[EngineRequest], logits: torch.Tensor, drafts: list[list[int]]
    ) -> Emitted:
        """Per request the (token, logprob) pairs this step emits: one sampled, or the verified drafts."""
        starts = row_starts(drafts)
        chosen: Emitted = [[] for _ in requests]
        plain = [i for i, r in enumerate(requests) if not speculates(r.seq.params, r.adapter)]
        allowed = None
        if any(requests[i].guide is not None for i in plain):
            allowed, failed = allowed_tokens([requests[i].guide for i in plain], logits.shape[-1])
            for row, error in failed.items():  # a grammar at a dead end ends its own request only
                self.failures.fail_requests([requests[plain[row]]], error)
            if failed:
                keep = [row for row in range(len(plain)) if row not in failed]
                plain, allowed = [plain[row] for row in keep], allowed[keep]
        if plain:
            seqs = [requests[i].seq for i in plain]
            rows = logits[torch.tensor([starts[i] for i in plain])]
            tokens, logprobs = _sample(rows, seqs, [s.generator for s in seqs], allowed)
            for i, token, logprob in zip(plain, tokens.tolist(), logprobs.tolist(), strict=True):
                chosen[i] = [(token, logprob)]
        for i in range(len(requests)):
            if chosen[i] or not speculates(requests[i].seq.params, requests[i].adapter):
                continue
            chosen[i] = self.drafter.verify(requests[i], drafts[i], logits[starts[i] : starts[i + 1]])
        masks = {i: allowed[row] for row, i in enumerate(plain)} if allowed is not None else {}
        _fork_first_tokens(requests, logits, starts, masks)
        return chosen


def _fork_first_tokens(
    requests: list[EngineRequest], logits: torch.Tensor, starts: list[int], masks: dict[int, torch.Tensor]
) -> None:
    """The first token of each pending fork of the requests just prefilled, drawn with the fork's own
    generator from its parent's prefill logits (the prompt is computed once for all n choices), within
    the parent's grammar mask when it is constrained (every fork starts where the parent started)."""
    parents = [
        i
        for i, r in enumerate(requests)
        if r.fork_generators and not r.fork_firsts and r.seq.status is not SequenceStatus.FINISHED
    ]
    if not parents:
        return
    owners = [i for i in parents for _ in requests[i].fork_generators]
    rows = logits[torch.tensor([starts[i] for i in owners])]
    generators = [g for i in parents for g in requests[i].fork_generators]
    allowed = None
    if any(i in masks for i in owners):
        everything = torch.ones(logits.shape[-1], dtype=torch.bool)
        allowed = torch.stack([masks.get(i, everything).to(everything.device) for i in owners])
    tokens, logprobs = _sample(rows, [requests[i].seq for i in owners], generators, allowed)
    pairs = list(zip(tokens.tolist(), logprobs.tolist(), strict=True))
    for i in parents:
        count = len(requests[i].fork_generators)
        requests[i].fork_firsts, pairs = pairs[:count], pairs[count:]


def _sample(
    rows: torch.Tensor,
    seqs: list[SequenceState],
    generators: list[torch.Generator | None],
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per logits row `[R, V]`, row r for `seqs[r]` drawing from `generators[r]` (within
    `allowed[r]`'s tokens when given); the histories the penalties read are built only if some row has one."""
    empty: list[torch.Tensor | list[int]] = [[] for _ in seqs]
    histories = (
        [torch.tensor(s.all_token_ids) for s in seqs]
        if any(s.params.repetition_penalty != 1.0 for s in seqs)
        else empty
    )
    generated = (
        [torch.tensor(s.output_token_ids) for s in seqs]
        if any(s.params.additive_penalties for s in seqs)
        else empty
    )
    return sample_next_tokens(
        rows, [s.params for s in seqs], histories, generators, allowed=allowed, generated=generated
    )


def _active_adapters(requests: list[EngineRequest]) -> tuple[list[AdapterWeights], list[int]]:
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
