"""Tool calling in chat with the official `openai` client: forced calls (named, required) constrained to
the functions' schemas, calls read from free output, tool results in the conversation, streamed or whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from server_support import LiveServingServer

from worker.serving.chat_tools import ChatTools

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=1024) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _valid(call: Any) -> None:
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", ["", "acme/1"])
def test_a_named_tool_choice_forces_a_valid_call_whole_and_streamed(
    client: openai.OpenAI, model: str
) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=60,
        temperature=1.0,
        seed=2,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    _valid(call)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=60,
            temperature=1.0,
            seed=2,
            stream=True,
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.arguments for d in deltas if d.function] == [call.function.arguments]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_gives_calls_of_declared_functions(client: openai.OpenAI) -> None:
    for seed in range(4):
        reply = client.chat.completions.create(
            model="acme/2",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,  # a random model would add calls until max_tokens cut the array
            max_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        calls = reply.choices[0].message.tool_calls or []
        assert len(calls) == 1 and reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        for call in calls:
            _valid(call)


def test_auto_reads_hermes_or_bare_json_calls_and_leaves_text_alone() -> None:
    tools = ChatTools.of(TOOLS, "auto", None)
    content, calls = tools.calls(
        'Sure. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    )
    assert content == "Sure." and calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    content, calls = tools.calls('{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert tools.calls('{"name": "rm_rf", "arguments": {}}') == ('{"name": "rm_rf", "arguments": {}}', [])
    assert tools.calls("Just text.") == ("Just text.", [])


def test_a_conversation_with_tool_calls_and_results_is_accepted(client: openai.OpenAI) -> None:
    messages: Any = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = client.chat.completions.create(
        model="", messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=5, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(
        model="", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5, temperature=0
    )
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tools_are_400_naming_the_field(client: openai.OpenAI, extra: dict[str, Any], field: str) -> None:
    body = {"tools": TOOLS} | extra
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=MESSAGES, max_tokens=4, extra_body=body)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == field
