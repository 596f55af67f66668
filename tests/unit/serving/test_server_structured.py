"""Structured output over HTTP: OpenAI's `response_format` and `guided_regex` (official `openai` client),
LoRAX's `parameters.response_format`, and bad constraints refused with a 400 naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_support import LiveServingServer

PROMPT = "The quick brown fox"
ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["id", "kind", "flags"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=512) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["", "acme/2"])
def test_chat_json_schema_output_validates_whole_and_streamed(client: openai.OpenAI, model: str) -> None:
    messages: Any = [{"role": "user", "content": "an item please"}]
    for seed in range(3):
        reply = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=80,
            temperature=1.0,
            seed=seed,
            response_format=SCHEMA_FORMAT,
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), ITEM)
        chunks = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=80,
            temperature=1.0,
            seed=seed,
            response_format=SCHEMA_FORMAT,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content


def test_completion_json_object_and_guided_regex(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="acme/1",
        prompt=PROMPT,
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    text = whole.choices[0].text
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # an unbounded object may run out of tokens: still a valid prefix of one
        assert text.startswith("{")
    pattern = r"(yes|no) [0-9]{2}"
    regexed = client.completions.create(
        model="", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=1, extra_body={"guided_regex": pattern}
    )
    assert re.fullmatch(pattern, regexed.choices[0].text) and regexed.choices[0].finish_reason == "stop"


def test_lorax_response_format_json_and_regex(server: LiveServingServer) -> None:
    body = {
        "inputs": PROMPT,
        "parameters": {
            "max_new_tokens": 80,
            "do_sample": True,
            "seed": 4,
            "adapter_id": "acme/3",
            "response_format": {"type": "json_object", "schema": ITEM},
            "details": True,
        },
    }
    reply = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    jsonschema.validate(json.loads(reply["generated_text"]), ITEM)
    assert reply["details"]["finish_reason"] == "eos_token"
    body["parameters"]["response_format"] = {"type": "regex", "schema": "[a-c]{4}"}
    events = httpx.post(f"{server.url}/generate_stream", json=body, timeout=60).text.split("\n\n")
    last = json.loads([e for e in events if e.startswith("data:")][-1].removeprefix("data:"))
    assert re.fullmatch("[a-c]{4}", last["generated_text"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "string", "minLength": 3, "maxLength": 1},
                    },
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {f"p{i}": {"type": "string"} for i in range(5000)},
                        },
                    },
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_regex": "(abc"}, "guided_regex"),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
def test_a_bad_constraint_is_400_naming_the_field_and_the_engine_keeps_serving(
    server: LiveServingServer, client: openai.OpenAI, body: dict[str, Any], field: str
) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | body
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field and field in response.json()["error"]["message"]
    after = client.completions.create(
        model="acme/1", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert after.usage is not None and after.usage.completion_tokens == 3


def test_lorax_bad_constraint_is_400(server: LiveServingServer) -> None:
    body = {"inputs": PROMPT, "parameters": {"response_format": {"type": "regex", "schema": "(x"}}}
    response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert response.status_code == 400 and "response_format" in response.json()["error"]
