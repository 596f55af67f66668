"""The engine's speculative side: which drafts a step verifies, what it keeps of them, and the next
step's drafts from each request's speculator (Medusa heads, speculator.py, or an eagle draft layer,
eagle.py).

`LLMEngine.step()` calls `to_verify` for each decoding request before the forward pass, `verify` for
each speculating request on the logits of its rows, and `propose` once after the step's tokens were
emitted. The drafts live on the request (`drafts`, `draft_probs`, `draft_state`) between steps.
"""

from __future__ import annotations

import itertools

import torch

from worker.serving import acceptance
from worker.serving.eagle import EagleDraft, PendingPairs
from worker.serving.kv_cache import BlockManager
from worker.serving.linear import KERNEL_TOKENS
from worker.serving.lora import AdapterWeights
from worker.serving.metrics import ServingMetrics
from worker.serving.model_runner import ModelRunner, StepHidden
from worker.serving.outputs import SpeculationStats
from worker.serving.params import SamplingParams
from worker.serving.request import EngineRequest
from worker.serving.speculator import Speculator


def speculates(params: SamplingParams, adapter: AdapterWeights | None) -> bool:
    """Requests whose adapter has heads, unless something shapes their logits beyond the warpers (a
    penalty, whose p at each verified position would depend on the drafts accepted before it, or a
    logit_bias) or a grammar constrains the output: those decode one token a step through the ordinary
    sampler, so every token is chosen from the shaped (or masked) distribution with its exact history."""
    return (
        adapter is not None
        and adapter.speculator is not None
        and not params.shapes_logits
        and params.constraint is None
    )


class Drafter:
    """Proposes and verifies drafts for the engine's requests; owns no state of its own beyond settings."""

    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        metrics: ServingMetrics,
        *,
        max_model_len: int,
        max_batch: int,
        depth: int | None,
    ) -> None:
        self.runner = runner
        self.blocks = blocks
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.max_batch = max_batch  # EngineConfig.speculation_max_batch, resolved for the device
        self.depth_limit = depth  # EngineConfig.speculation_depth

    def to_verify(self, request: EngineRequest) -> list[int]:
        """The drafts this step verifies: cut to what the request may still emit and the cache holds."""
        drafts, request.drafts = request.drafts, []
        seq = request.seq
        room = min(
            seq.params.max_tokens - len(seq.output_token_ids) - 1,  # one token is always emitted besides
            self.max_model_len - len(seq) - 1,
        )
        drafts = drafts[: max(room, 0)]
        if not seq.params.ignore_eos:  # nothing after an end-of-sequence draft could ever be emitted
            ends = [i for i, token in enumerate(drafts) if token in self.runner.eos_token_ids]
            drafts = drafts[: ends[0] + 1] if ends else drafts
        if drafts and not self.blocks.reserve(seq, len(seq) + len(drafts)):
            return []  # no spare blocks: decode one token, never preempt for speculation
        return drafts

    def verify(
        self, request: EngineRequest, drafts: list[int], rows: torch.Tensor
    ) -> list[tuple[int, float]]:
        """The (token, logprob) pairs a speculating request emits from its rows' logits `[1 + drafts, V]`:
        the drafts the model confirms, then one token of its own; counts the step's acceptance."""
        params = request.seq.params
        if params.greedy:
            kept = acceptance.accept_greedy(drafts, rows.argmax(-1).tolist())
        else:
            kept = acceptance.accept_sampled(drafts, request.draft_probs, rows, params, request.seq.generator)
        kept_logprobs = torch.log_softmax(rows[: len(kept)], -1).gather(1, torch.tensor(kept)[:, None])
        if drafts:
            self.metrics.spec_steps.inc()
            self.metrics.spec_drafted.inc(len(drafts))
            self.metrics.spec_accepted.inc(len(kept) - 1)
            so_far = request.speculation or SpeculationStats()
            request.speculation = SpeculationStats(
                so_far.steps + 1, so_far.drafted + len(drafts), so_far.accepted + len(kept) - 1
            )
        return list(zip(kept, kept_logprobs[:, 0].tolist(), strict=True))

    def propose(
        self,
        requests: list[EngineRequest | None],
        drafts: list[list[int]],
        emitted: list[list[tuple[int, float]]],
        hidden: StepHidden,
        prefill_lengths: list[int] | None,
    ) -> None:
        """Next step's drafts for the step's unfinished speculating requests (`requests`, in step order,
        with None for one that finished), from the step's hidden states: Medusa heads read the hidden
        state of each request's last emitted token; eagle draft layers first commit the step's new
        (hidden state, token) pairs."""
        # A large batch decodes one token a step (see EngineConfig.speculation_max_batch). Its eagle
        # requests drop their draft cache rather than keep committing to it: committing costs a large
        # batch measurable throughput, so they speculate again only after a prefill.
        propose = len(requests) <= self.max_batch
        speculating = sum(r is not None and speculates(r.seq.params, r.adapter) for r in requests)
        starts = row_starts(drafts)
        committed = final_rows(starts, emitted, prefill_lengths)
        # Per speculator (by identity): the speculator and its greedy requests with their hidden rows.
        greedy: dict[int, tuple[Speculator, list[tuple[EngineRequest, int]]]] = {}
        eagle: dict[int, tuple[EagleDraft, list[EngineRequest], list[PendingPairs]]] = {}
        for i, request in enumerate(requests):
            if request is None or not speculates(request.seq.params, request.adapter):
                continue
            assert request.adapter is not None and request.adapter.speculator is not None
            speculator = request.adapter.speculator
            if isinstance(speculator, EagleDraft):
                if not propose:
                    request.draft_state = None
                    continue
                first, count = committed[i]
                pairs = self._eagle_pairs(
                    request, speculator, hidden.tokens, first, count, bool(prefill_lengths)
                )
                if pairs is not None:
                    members = eagle.setdefault(id(speculator), (speculator, [], []))
                    members[1].append(request)
                    members[2].append(pairs)
            elif propose and isinstance(speculator, Speculator):
                last = starts[i] + len(emitted[i]) - 1  # the row whose logits gave the last emitted token
                if request.seq.params.greedy:
                    greedy.setdefault(id(speculator), (speculator, []))[1].append((request, last))
                else:
                    self._propose_sampled(request, speculator, hidden.rows[last : last + 1], speculating)
        self._propose_greedy(list(greedy.values()), hidden.rows, speculating)
        self._propose_eagle(list(eagle.values()), speculating)

    def _propose_sampled(
        self, request: EngineRequest, heads: Speculator, row: torch.Tensor, speculating: int
    ) -> None:
        """A sampled request's drafts from Medusa heads on its last emitted token's hidden state `[1, D]`."""
        request.drafts, request.draft_probs = heads.propose_sampled(
            row,
            self.runner.lm_head,
            request.seq.params,
            request.seq.generator,
            self.depth(heads.num_heads, speculating),
        )

    def _propose_greedy(
        self,
        groups: list[tuple[Speculator, list[tuple[EngineRequest, int]]]],
        rows: torch.Tensor,
        speculating: int,
    ) -> None:
        """Greedy drafts for each Medusa speculator's requests: one pass of the heads over their rows of
        `rows` `[B or T, D]`."""
        for heads, group in groups:
            chosen = rows[torch.tensor([last for _, last in group], device=rows.device)]
            proposed = heads.propose(chosen, self.runner.lm_head, self.depth(heads.num_heads, speculating))
            for (request, _), request_drafts in zip(group, proposed.tolist(), strict=True):
                request.drafts = request_drafts

    def _propose_eagle(
        self,
        groups: list[tuple[EagleDraft, list[EngineRequest], list[PendingPairs]]],
        speculating: int,
    ) -> None:
        """Commits and drafts for each eagle draft model's requests: one batched layer pass per model."""
        for draft, draft_requests, pending in groups:
            proposals = draft.commit_and_propose(
                self.runner, pending, self.depth(draft.num_heads, speculating)
            )
            for request, proposal in zip(draft_requests, proposals, strict=True):
                if proposal is not None:
                    request.drafts, request.draft_probs = proposal

    def depth(self, trained: int, speculating: int) -> int:
        """Drafts per request this step: the trained depth, capped by speculation_depth and, on the CPU,
        so that the next step's rows (1 + drafts per speculating request) fit the small-step kernel,
        past which a step falls back to torch's much slower few-row GEMM (two requests verifying 6
        drafts each were no faster than plain decoding; 3 each fit the kernel's 8 rows)."""
        depth = min(trained, self.depth_limit or trained)
        if self.runner.kernel is not None and speculating > 0:
            depth = min(depth, max(1, KERNEL_TOKENS // speculating - 1))
        return depth

    def _eagle_pairs(
        self,
        request: EngineRequest,
        draft: EagleDraft,
        step_hidden: torch.Tensor,
        first: int,
        count: int,
        prefill: bool,
    ) -> PendingPairs | None:
        """The `count` pairs (hidden state at step row first + i of `step_hidden` `[T, D]`, the token
        after it) this step made final, for the request's draft cache: a fresh one at a prefill
        (preemption's recompute included). None if its cache does not end where the step began."""
        seq = request.seq
        if prefill and count == len(seq) - 1:  # the whole sequence was fed (a chunked step's decoding
            request.draft_state = draft.new_state()  # requests feed one token and keep their cache)
        state = request.draft_state
        if state is None or state.length != len(seq) - count - 1:
            request.draft_state = None  # out of step with the sequence: drafting resumes at a prefill
            return None
        features = step_hidden[first : first + count]
        return PendingPairs(state, features, seq.all_token_ids[-count:], seq.params, seq.generator)


def final_rows(
    starts: list[int], emitted: list[list[tuple[int, float]]], prefill_lengths: list[int] | None
) -> list[tuple[int, int]]:
    """Each request's (first row, rows) of the step's hidden states whose tokens are now final: after a
    prefill all of them, after a decode step its fed token's row onward, one per emitted token (the
    drafts past the accepted ones are not final)."""
    if prefill_lengths:
        prefill_starts = itertools.accumulate(prefill_lengths, initial=0)
        return list(zip(prefill_starts, prefill_lengths, strict=False))
    return [(start, len(tokens)) for start, tokens in zip(starts, emitted, strict=False)]


def row_starts(drafts: list[list[int]]) -> list[int]:
    """Where each sequence's rows begin in a step's logits: its last token, then its drafts."""
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + 1 + len(d))
    return starts
