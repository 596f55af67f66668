"""n choices from one prefill: a request asking for n choices is one sequence until its prompt is
prefilled, then forks into n sequences that share the prompt's KV blocks (kv_cache.BlockManager.fork).

The step that prefills the parent also draws each fork's first token from the parent's prefill logits,
with the fork's own generator (stepping._fork_first_tokens); the engine then makes the forks running
sequences of their own (`make_forks`) before the parent's first token is emitted, so that they hold
the shared blocks before the parent could free them. Choice j of a seeded request draws from
seed + j (`SamplingParams.choice_seed`): the choices are reproducible and distinct, and choice 0 is
what the same request with n = 1 gives.

Forks of a request whose adapter has Medusa heads speculate from their first decode step on (the heads
read the step's hidden states); an eagle draft layer keeps a draft cache per sequence that only a
prefill builds, so an eagle adapter's forks decode one token a step (the parent speculates).
"""

from __future__ import annotations

from typing import Any

import torch

from worker.serving.detokenizer import IncrementalDetokenizer
from worker.serving.errors import TooManyChoicesError
from worker.serving.kv_cache import BlockManager, KVCache
from worker.serving.params import MAX_CHOICES_SHARE, SamplingParams
from worker.serving.request import EngineRequest
from worker.serving.sampling import make_generator
from worker.serving.sequence import Sequence, SequenceStatus


def check_choices_fit(
    prompt_tokens: int, params: SamplingParams, num_blocks: int, max_batch_size: int
) -> None:
    """Refuses (400 naming `n`) a request whose n choices would take more than MAX_CHOICES_SHARE of the
    batch's slots, or could hold more than that share of the KV cache (each choice at its longest,
    counting the prompt once per choice: a preempted fork recomputes its own copy)."""
    if params.n == 1:
        return
    slots = max(1, int(max_batch_size * MAX_CHOICES_SHARE))
    if params.n > slots:
        raise TooManyChoicesError(
            f"n={params.n} choices would take more than {slots} of this server's {max_batch_size} batch "
            "slots, the most one request may take: lower n",
            field="n",
        )
    need = params.n * BlockManager.blocks_needed(prompt_tokens + params.max_tokens)
    limit = int(num_blocks * MAX_CHOICES_SHARE)
    if need > limit:
        raise TooManyChoicesError(
            f"n={params.n} choices of up to {prompt_tokens + params.max_tokens} tokens each (prompt + "
            f"max_tokens) could take {need} KV-cache blocks; one request may take at most {limit} on this "
            "server: lower n, max_tokens or the prompt",
            field="n",
        )


def fork_generators(params: SamplingParams) -> list[torch.Generator | None]:
    """The generators of choices 1..n-1 (choice 0, the parent, has its own)."""
    return [make_generator(params.choice_seed(j)) for j in range(1, params.n)]


def make_forks(
    parent: EngineRequest, blocks: BlockManager, cache: KVCache, tokenizer: Any
) -> list[tuple[EngineRequest, int, float]]:
    """The parent's forks as running requests sharing its prompt's blocks, each with the first token
    (and its logprob) it drew; they still have to be registered and their first token emitted."""
    firsts, generators = parent.fork_firsts, parent.fork_generators
    parent.fork_firsts, parent.fork_generators, parent.seq.forks = [], [], 0
    seq = parent.seq
    forks = []
    for choice, ((token, logprob), generator) in enumerate(zip(firsts, generators, strict=True), start=1):
        child = Sequence(
            list(seq.prompt_token_ids),
            seq.params,
            adapter_key=seq.adapter_key,
            generator=generator,
            arrival=seq.arrival,
            status=SequenceStatus.RUNNING,
            num_cached=seq.num_prompt_tokens,
        )
        blocks.fork(seq, child, cache)
        request = EngineRequest(
            child,
            IncrementalDetokenizer(tokenizer, child.prompt_token_ids, seq.params.stop),
            deliver=parent.deliver,
            adapter_ref=parent.adapter_ref,
            async_deliver=parent.async_deliver,
            adapter=parent.adapter,
            choice=choice,
            family_id=parent.family_id,
        )
        forks.append((request, token, logprob))
    return forks
