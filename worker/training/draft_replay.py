"""Owns the accepted length a speculator would get when served: greedy speculative decoding replayed on
held-out prompts, step by step the way the serving engine drafts and verifies (worker/serving/drafting.py).

A greedy request emits exactly the model's greedy continuation whether or not it speculates; speculation
changes only how many of those tokens each verification step emits. So the frozen model's continuation
of each prompt and its hidden states are computed once (`prepare`), and measuring the speculator runs
only the draft over them (`drafts`) and replays the engine's steps (`replay`):
  - after emitting g_e (at position P + e, P the prompt length) a step drafts from the pair
    (h_{P+e-1}, g_e): the eagle draft's chain is its training-time-test passes j at P + e - 1 + j (pass j
    conditions on the earlier drafts through the true tokens, which equal the drafts wherever acceptance
    still counts); Medusa head j reads h_{P+e-1}. Either way the argmax over the draft vocabulary;
  - drafts are cut to what the request may still emit (max_tokens) and after the first EOS draft;
  - the model keeps the longest prefix equal to its own greedy tokens, then emits one token of its own.
The counts are the engine's: steps that verified drafts, drafted, accepted, so that mean accepted length
= (accepted + steps) / steps is the figure `/metrics` and the measured speedup report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.training import eagle, quality
from worker.training.methods import TrainableModel
from worker.training.speculator import MedusaHeads

NO_DRAFT = -1


@dataclass(frozen=True)
class HeldOutText:
    """One held-out prompt followed by the frozen model's greedy continuation (its stop token included)."""

    prompt_length: int
    tokens: torch.Tensor  # [S] long, on the run's device
    hidden: torch.Tensor  # [1, S, D] final-norm hidden states (what the LM head reads)


@dataclass(frozen=True)
class ReplayCounts:
    """What the engine's speculation counters would read after decoding the texts one by one."""

    steps: int = 0  # verification steps that had drafts
    drafted: int = 0
    accepted: int = 0

    def __add__(self, other: ReplayCounts) -> ReplayCounts:
        return ReplayCounts(
            self.steps + other.steps, self.drafted + other.drafted, self.accepted + other.accepted
        )

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts plus the model's own token."""
        return (self.accepted + self.steps) / self.steps if self.steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def prepare(
    trainable: TrainableModel, prompts: Sequence[list[int]], *, max_new_tokens: int
) -> list[HeldOutText]:
    """Each prompt's greedy continuation by the (frozen) model, one request at a time as serving runs a
    single stream, and the hidden states of prompt + continuation."""
    model, causal_lm = trainable.model, trainable.causal_lm()
    stops = set(quality.stop_ids(causal_lm, trainable.tokenizer))
    device = trainable.runtime.device
    was_training = model.training
    model.eval()
    texts = []
    try:
        for prompt in prompts:
            tokens = torch.tensor(prompt + _continuation(model, prompt, stops, max_new_tokens), device=device)
            hidden = causal_lm.get_decoder()(input_ids=tokens[None]).last_hidden_state  # [1, S, D]
            texts.append(HeldOutText(len(prompt), tokens, hidden))
    finally:
        model.train(was_training)
    return texts


def _continuation(model: torch.nn.Module, prompt: list[int], stops: set[int], limit: int) -> list[int]:
    """Greedy tokens after `prompt`, up to `limit`, ending with the first stop token if one comes."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    while True:
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token in stops or len(generated) >= limit:
            return generated
        fed = torch.tensor([[token]], device=device)
        out = model(input_ids=fed, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def drafts(trainable: TrainableModel, text: HeldOutText) -> torch.Tensor:
    """[S, K] the K drafts a step starting at each position t proposes (t = the position before the
    last emitted token); NO_DRAFT where the chain runs past the text."""
    heads = trainable.speculator
    assert heads is not None
    causal_lm = trainable.causal_lm()
    lm_head = causal_lm.get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Module)
    rows, _ = heads.vocab_rows(lm_head)  # [Vd or V, D]
    features = text.hidden.float()  # [1, S, D]
    s, depth = features.shape[1], heads.config.num_heads
    if isinstance(heads, eagle.EagleDraft):
        embed = causal_lm.get_input_embeddings()
        assert isinstance(embed, torch.nn.Module)
        ids = text.tokens[None]  # [1, S]
        next_embeds = embed(F.pad(ids[:, 1:], (0, 1))).float()  # E[x_{p+1}]
        positions = torch.arange(s, device=ids.device)[None]
        cos, sin = causal_lm.get_decoder().rotary_emb(features, positions)
        outputs = heads.unroll(features, next_embeds, torch.zeros_like(ids), cos.float(), sin.float())
    else:
        assert isinstance(heads, MedusaHeads)
        outputs = [block(features) for block in heads.heads]
    chosen = torch.full((s, depth), NO_DRAFT, dtype=torch.long, device=features.device)
    for j, output in enumerate(outputs):
        picked = F.linear(output[0], rows).argmax(-1)  # [S] index into the draft vocabulary
        tokens = picked if heads.draft_vocab is None else heads.draft_vocab.to(picked.device)[picked]
        # Eagle pass j at t + j is a step's (j+1)-th draft from t; a Medusa head drafts from t itself.
        shift = j if isinstance(heads, eagle.EagleDraft) else 0
        chosen[: s - shift, j] = tokens[shift:]
    return chosen


def replay(
    text: HeldOutText, chosen: torch.Tensor, *, max_new_tokens: int, eos_token_ids: set[int]
) -> ReplayCounts:
    """The engine's greedy speculative steps over one text (module docstring); `chosen` from `drafts`."""
    continuation = text.tokens[text.prompt_length :].tolist()
    table = chosen.tolist()
    steps = drafted = accepted = 0
    emitted = 1  # the prefill emits the first token
    while emitted < len(continuation):
        room = max_new_tokens - emitted - 1  # one token is always emitted besides the drafts
        proposal = table[text.prompt_length + emitted - 2][: max(room, 0)]
        proposal = proposal[: proposal.index(NO_DRAFT)] if NO_DRAFT in proposal else proposal
        ends = [i for i, token in enumerate(proposal) if token in eos_token_ids]
        proposal = proposal[: ends[0] + 1] if ends else proposal
        kept = 0
        while kept < len(proposal) and emitted + kept < len(continuation):
            if proposal[kept] != continuation[emitted + kept]:
                break
            kept += 1
        if proposal:
            steps, drafted, accepted = steps + 1, drafted + len(proposal), accepted + kept
        emitted += kept + 1
    return ReplayCounts(steps, drafted, accepted)


def measure(
    trainable: TrainableModel, texts: Sequence[HeldOutText], *, max_new_tokens: int
) -> list[ReplayCounts]:
    """Per text, the counts of serving it greedily with the run's speculator as it is now."""
    stops = set(quality.stop_ids(trainable.causal_lm(), trainable.tokenizer))
    heads = trainable.speculator
    assert heads is not None
    was_training = heads.training
    heads.eval()
    try:
        return [
            replay(text, drafts(trainable, text), max_new_tokens=max_new_tokens, eos_token_ids=stops)
            for text in texts
        ]
    finally:
        heads.train(was_training)
