"""What `VllmEngine` asks of vLLM for n choices, penalties and logit_bias, and how it merges the answers.

vLLM cannot run in unit tests: its `/v1/completions` is played by an httpx transport that answers each
streamed request the way vLLM's OpenAI server frames it (one token per chunk, `[DONE]` last). The
engine's tokenizer is the tiny model's; everything else (bodies, detokenizing, merging) is the real code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from worker.serving.adapters import LocalDirectorySource
from worker.serving.errors import InvalidParameterError
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.vllm_engine.engine import VllmEngine
from worker.serving.vllm_engine.process import VllmConfig


def vllm_reply(body: dict[str, object]) -> httpx.Response:
    """vLLM's streamed chunks for a body: tokens derived from its seed, `max_tokens` of them."""
    seed = int(body["seed"])  # type: ignore[arg-type]
    count = int(body["max_tokens"])  # type: ignore[arg-type]
    lines = []
    for i in range(count):
        last = i == count - 1
        choice = {
            "index": 0,
            "text": "",
            "token_ids": [100 + (seed * 7 + i) % 50],
            "logprobs": {"token_logprobs": [-0.5]},
            "finish_reason": "length" if last else None,
        }
        lines.append(f"data: {json.dumps({'choices': [choice]})}\n\n")
    lines.append("data: [DONE]\n\n")
    return httpx.Response(200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture
def engine(tiny_model_dir: Path, tmp_path: Path) -> VllmEngine:
    config = VllmConfig(python=Path("/nonexistent/python"), model_path=tiny_model_dir, model_name="tiny")
    engine = VllmEngine(config, LocalDirectorySource(tmp_path))
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine.vocab_size = 32000
    engine._max_model_len = 256
    return engine


def run(engine: VllmEngine, params: SamplingParams) -> tuple[list[dict[str, object]], list[TokenOutput]]:
    bodies: list[dict[str, object]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        return vllm_reply(body)

    async def collect() -> list[TokenOutput]:
        engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
        outputs = [output async for output in engine.generate([1, 450, 4996], params)]
        await engine._client.aclose()
        return outputs

    return bodies, asyncio.run(collect())


def test_n_choices_are_n_vllm_requests_seeded_seed_plus_j(engine: VllmEngine) -> None:
    params = SamplingParams(max_tokens=4, seed=40, n=3, ignore_eos=True)
    bodies, outputs = run(engine, params)
    assert sorted(int(b["seed"]) for b in bodies) == [40, 41, 42]  # type: ignore[call-overload]
    assert all("n" not in b or b["n"] == 1 for b in bodies)
    by_choice: dict[int, list[int]] = {}
    for output in outputs:
        by_choice.setdefault(output.choice, []).append(output.token_id)
    assert by_choice == {j: [100 + ((40 + j) * 7 + i) % 50 for i in range(4)] for j in range(3)}
    assert sorted(o.choice for o in outputs if o.finished) == [0, 1, 2]


def test_penalties_and_logit_bias_are_sent_in_vllms_terms(engine: VllmEngine) -> None:
    params = SamplingParams(
        max_tokens=2, seed=1, presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((7, 100.0), (9, -3.5))
    )
    (body,), _ = run(engine, params)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -1.0)
    assert body["logit_bias"] == {"7": 100.0, "9": -3.5}
    (plain,), _ = run(engine, SamplingParams(max_tokens=2, seed=1))
    assert plain["logit_bias"] is None and plain["presence_penalty"] == 0.0


def test_logit_bias_outside_the_vocabulary_is_refused_before_vllm_sees_it(engine: VllmEngine) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        engine.validate([1, 2], SamplingParams(logit_bias=((32000, 1.0),)))
    assert caught.value.field == "logit_bias"
