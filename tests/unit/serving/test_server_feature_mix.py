"""The serving API's features together, through the official `openai` client: n choices of a constrained
request all follow the grammar (the forks' first tokens too), every choice of n carries its logprobs,
prompt lists echo each prompt with its own scored tokens, and forced tool calls hold for every choice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from server_support import LiveServingServer

PROMPT = "The quick brown fox"
ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "kind": {"enum": ["a", "b"]}},
    "required": ["id", "kind"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=512) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["", "acme/2"])
def test_every_choice_of_a_constrained_request_validates(
    client: openai.OpenAI, server: LiveServingServer, model: str
) -> None:
    prompt_tokens = len(server.engine.tokenizer(PROMPT)["input_ids"])
    before = float(server.engine.metrics.prompt_tokens._value.get())
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}
    reply = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=60,
        temperature=1.0,
        seed=5,
        n=4,
        extra_body={"response_format": fmt},
    )
    assert float(server.engine.metrics.prompt_tokens._value.get()) - before == prompt_tokens  # one prefill
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), ITEM)


def test_each_of_n_choices_carries_logprobs_for_every_token(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.usage is not None and reply.usage.completion_tokens == 15
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
        assert len(choice.logprobs.tokens or []) == 5
        assert all(len(alternatives) >= 2 for alternatives in choice.logprobs.top_logprobs)
        assert all(value is not None and value <= 0 for value in choice.logprobs.token_logprobs or [])
    # The forks drew their first token from the parent's distribution: the same two most likely
    # alternatives at the first position (the chosen token is added when it is not among them).
    firsts = [c.logprobs.top_logprobs[0] for c in reply.choices if c.logprobs and c.logprobs.top_logprobs]
    best_two = [tuple(sorted(first, key=lambda token: -first[token])[:2]) for first in firsts]
    assert len(best_two) == 3 and len(set(best_two)) == 1, firsts


def test_a_prompt_list_echoes_each_prompt_with_its_own_scored_tokens(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "Hello there"]
    reply = client.completions.create(
        model="",
        prompt=prompts,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in sorted(reply.choices, key=lambda c: c.index)] == [0, 1]
    for choice in reply.choices:
        prompt = prompts[choice.index]
        assert choice.text.startswith(prompt)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
        assert "".join(choice.logprobs.tokens or []) == choice.text


def test_a_forced_tool_call_holds_for_every_choice_whole_and_streamed(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    messages: Any = [{"role": "user", "content": "Weather?"}]
    reply = client.chat.completions.create(
        model="",
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        n=2,
        max_tokens=40,
        temperature=1.0,
        seed=9,
    )
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="",
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        n=2,
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    calls: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                calls[choice.index] = (call.function.arguments or "") if call.function else ""
    assert sorted(calls) == [0, 1]
    for arguments in calls.values():
        jsonschema.validate(json.loads(arguments), WEATHER)


def test_fifty_sampled_schema_requests_across_adapters_validate_with_openai_and_lorax_clients(
    client: openai.OpenAI, server: LiveServingServer
) -> None:
    """Sent together, so the engine decodes them in mixed batches: constrained rows of several adapters
    and the base model, at temperature 1 (sampling explores what the grammar allows)."""
    from concurrent.futures import ThreadPoolExecutor

    from lorax import Client

    fmt: Any = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}
    models = ["", "acme/1", "acme/2"]

    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model=models[i % 3], messages=[{"role": "user", "content": f"item {i}"}], max_tokens=60,
            temperature=1.0, seed=i, response_format=fmt,
        )  # fmt: skip
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    for answer in answers:
        jsonschema.validate(json.loads(answer), ITEM)
    lorax = Client(server.url, timeout=60)
    for adapter in (None, "acme/1"):
        generated = lorax.generate(
            PROMPT, adapter_id=adapter, max_new_tokens=60, do_sample=True, temperature=1.0, seed=3,
            response_format={"type": "json_object", "schema": ITEM},
        )  # fmt: skip
        jsonschema.validate(json.loads(generated.generated_text), ITEM)
