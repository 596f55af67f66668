"""The choices of one OpenAI request: several prompts (a /v1/completions prompt list), each generated
with n choices (or best_of, of which the n best are kept), merged into one stream of
(choice index, output) with OpenAI's and vLLM's numbering: index = prompt index * n + choice.

Each prompt is one engine request (prefilled once, its choices forked after it); the requests run
side by side in the engine's batch, and leaving early (error, client gone) closes every one of them,
which aborts all their choices.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request

from worker.serving.http_common import Generation, read_all
from worker.serving.merging import merge
from worker.serving.outputs import SpeculationStats, TokenOutput

Choices = dict[int, list[TokenOutput]]  # a choice's index → its outputs in order


@dataclass(frozen=True)
class Generations:
    """The engine requests of one OpenAI request, one per prompt, each of `width` choices."""

    items: list[Generation]
    width: int  # choices per prompt the engine generates (best_of, or n)

    def index(self, prompt: int, output: TokenOutput) -> int:
        return prompt * self.width + output.choice

    async def outputs(self) -> AsyncGenerator[tuple[int, TokenOutput], None]:
        """(choice index, output) as the engine produces them, every prompt's choices interleaved."""
        async with aclosing(merge([self._indexed(k, g) for k, g in enumerate(self.items)])) as merged:
            async for item in merged:
                yield item

    async def _indexed(
        self, prompt: int, generation: Generation
    ) -> AsyncGenerator[tuple[int, TokenOutput], None]:
        async with aclosing(generation.outputs()) as outputs:
            async for output in outputs:
                yield self.index(prompt, output), output

    async def collect(self, request: Request) -> Choices:
        """Every choice's outputs, for a whole (non-streamed) response; a client that leaves meanwhile
        aborts every request, as a streaming one does."""
        collected: Choices = {}
        for index, output in await read_all(request, self.outputs()):
            collected.setdefault(index, []).append(output)
        for prompt, generation in enumerate(self.items):  # cut short only when no one is left to read it
            collected.setdefault(self.index(prompt, generation.first), [generation.first])
        return collected

    async def aclose(self) -> None:
        for generation in self.items:
            await generation.aclose()


def cumulative_logprob(outputs: list[TokenOutput]) -> float:
    return sum(output.logprob for output in outputs if output.token_id >= 0)


def best_of(choices: Choices, prompts: int, best: int, n: int) -> Choices:
    """Per prompt, the n of its `best` choices with the highest cumulative logprob (of the raw model, as
    reported per token), renumbered prompt * n + rank, best first (OpenAI's and vLLM's best_of)."""
    kept: Choices = {}
    for prompt in range(prompts):
        candidates = [choices.get(prompt * best + j, []) for j in range(best)]
        ranked = sorted((c for c in candidates if c), key=cumulative_logprob, reverse=True)
        for rank, outputs in enumerate(ranked[:n]):
            kept[prompt * n + rank] = outputs
    return kept


def total_speculation(stats: Iterable[SpeculationStats | None]) -> SpeculationStats | None:
    """The choices' speculative decoding added up (None if none of them speculated)."""
    present = [s for s in stats if s is not None]
    if not present:
        return None
    return SpeculationStats(
        sum(s.steps for s in present), sum(s.drafted for s in present), sum(s.accepted for s in present)
    )
