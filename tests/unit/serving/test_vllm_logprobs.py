"""The vLLM engine's logprobs mapping, without vLLM: what the request to vLLM's /v1/completions asks for,
and how its streamed chunks (in the shape vLLM's completions stream sends with `echo`, `logprobs`,
`return_token_ids` and `return_tokens_as_token_ids`) become TokenOutputs' logprobs, alternatives and
scored prompt. The chunks are served over httpx's in-process transport to the engine's real stream code."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.serving.adapters import LocalDirectorySource
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.vllm_engine.engine import VllmEngine
from worker.serving.vllm_engine.process import VllmConfig
from worker.serving.vllm_engine.streaming import parse_choice

PROMPT = [1, 504, 3458]


def _entry(token: int, value: float | None, alternatives: dict[int, float] | None) -> dict[str, Any]:
    top = None if alternatives is None else {f"token_id:{t}": v for t, v in alternatives.items()}
    return {"token": f"token_id:{token}", "value": value, "top": top}


def _chunk(
    entries: list[dict[str, Any]], ids: list[int], reason: str | None, prompt: list[int] | None
) -> str:
    choice: dict[str, Any] = {
        "index": 0,
        "text": "",
        "logprobs": {
            "text_offset": list(range(len(entries))),
            "token_logprobs": [e["value"] for e in entries],
            "tokens": [e["token"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
        },
        "finish_reason": reason,
        "token_ids": ids,
    }
    if prompt is not None:
        choice["prompt_token_ids"] = prompt
    return "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]}) + "\n\n"


# vLLM puts the sampled token first in each position's alternatives, then its top k by rank.
PROMPT_ENTRIES = [
    _entry(1, None, None),
    _entry(504, -3.0, {504: -3.0, 7: -0.5, 9: -1.5}),
    _entry(3458, -0.1, {3458: -0.1, 7: -2.5}),
]
FIRST = _entry(282, -0.7, {282: -0.7, 11: -0.9, 12: -1.2})
SECOND = _entry(13, -4.0, {13: -4.0, 14: -0.3, 15: -0.8})


@pytest.fixture
def engine(tiny_model_dir: Path, tmp_path: Path) -> VllmEngine:
    """A VllmEngine whose HTTP client reaches `engine.fake_vllm` instead of a vLLM child (never started)."""
    from transformers import AutoTokenizer

    config = VllmConfig(python=tmp_path / "no-vllm", model_path=tiny_model_dir, model_name="tiny")
    engine = VllmEngine(config, LocalDirectorySource(tmp_path))
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine.vocab_size, engine._max_model_len, engine._ready = 49152, 256, True
    return engine


def _run(
    engine: VllmEngine, params: SamplingParams, chunks: list[str]
) -> tuple[list[TokenOutput], dict[str, Any]]:
    sent: dict[str, Any] = {}

    def fake_vllm(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, content="".join([*chunks, "data: [DONE]\n\n"]).encode())

    async def collect() -> list[TokenOutput]:
        engine._client = httpx.AsyncClient(transport=httpx.MockTransport(fake_vllm))
        try:
            return [output async for output in engine.generate(PROMPT, params)]
        finally:
            await engine._client.aclose()

    return asyncio.run(collect()), sent


def test_the_request_asks_vllm_for_ids_alternatives_and_the_echoed_prompt(engine: VllmEngine) -> None:
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outputs, sent = _run(
        engine,
        params,
        [_chunk([*PROMPT_ENTRIES, FIRST], [282], None, PROMPT), _chunk([SECOND], [13], "length", None)],
    )
    assert sent["logprobs"] == 2 and sent["echo"] is True and sent["return_tokens_as_token_ids"] is True
    assert sent["return_token_ids"] is True and sent["prompt"] == PROMPT
    assert [o.token_id for o in outputs] == [282, 13]
    assert [o.logprob for o in outputs] == [-0.7, -4.0]
    assert outputs[0].top_logprobs == ((282, -0.7), (11, -0.9))
    assert outputs[1].top_logprobs == ((14, -0.3), (15, -0.8))  # the sampled one is not among the top 2
    scored = outputs[0].prompt_logprobs
    assert scored is not None and outputs[1].prompt_logprobs is None
    assert scored.token_ids == tuple(PROMPT) and scored.logprobs == (None, -3.0, -0.1)
    assert scored.top == ((), ((7, -0.5),), ((3458, -0.1),))


def test_a_request_that_asks_for_nothing_sends_what_it_always_did(engine: VllmEngine) -> None:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    outputs, sent = _run(engine, params, [_chunk([_entry(282, -0.7, {282: -0.7})], [282], "length", None)])
    assert sent["logprobs"] == 0 and sent["echo"] is False
    assert outputs[0].logprob == -0.7 and outputs[0].top_logprobs == () and outputs[0].prompt_logprobs is None


def test_a_chunk_of_several_tokens_keeps_each_tokens_entry() -> None:
    choice = json.loads(_chunk([FIRST, SECOND], [282, 13], "stop", None)[len("data: ") :])["choices"][0]
    tokens = parse_choice(choice, top_k=1, prompt_k=None)
    assert [(t.token_id, t.logprob, t.top, t.finish_reason) for t in tokens] == [
        (282, -0.7, ((282, -0.7),), None),
        (13, -4.0, ((14, -0.3),), "stop"),
    ]
