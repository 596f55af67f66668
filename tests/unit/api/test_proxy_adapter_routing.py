"""The adapter the proxy routes a request by: read from the body defensively, "" for the base model."""

from __future__ import annotations

import json

import pytest

from app.api.serving_proxy import ROUTES, Target, adapter_of

TARGET = Target(tenant="acme", base_model="tiny-random-llama", name="tiny")


@pytest.mark.parametrize(
    ("body", "adapter"),
    [
        ({"model": "repo/3", "prompt": "hi"}, "repo/3"),  # OpenAI
        ({"model": "tiny", "prompt": "hi"}, ""),  # the deployment's own name: the base model
        ({"model": "tiny-random-llama", "messages": []}, ""),
        ({"inputs": "hi", "parameters": {"adapter_id": "repo/1@200"}}, "repo/1@200"),  # LoRAX
        ({"inputs": "hi", "parameters": {"max_new_tokens": 4}}, ""),
        ({"inputs": "hi"}, ""),
        ({"inputs": "hi", "parameters": {"adapter_id": 7}}, ""),  # the serving process answers the 422
        ({"inputs": "hi", "parameters": ["adapter_id"]}, ""),
        ({"model": None, "parameters": {"adapter_id": "repo/2"}}, "repo/2"),
        (["not", "an", "object"], ""),
        ({"model": "repo/4", "input": ["a", "b"], "encoding_format": "base64"}, "repo/4"),  # embeddings
        ({"inputs": "hi", "parameters": None, "stream": False}, ""),  # lorax-client's embed
        ({"inputs": ["a", "b"], "adapter_id": "repo/5"}, "repo/5"),  # /classify_batch
        ({"inputs": "a", "adapter_id": 5}, ""),
    ],
)
def test_the_adapter_is_read_from_openai_and_lorax_bodies(body: object, adapter: str) -> None:
    assert adapter_of(json.dumps(body).encode(), TARGET) == adapter


@pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe\x00", b'{"model": "r/1"', b"null"])
def test_a_body_that_is_not_json_routes_as_the_base_model(raw: bytes) -> None:
    assert adapter_of(raw, TARGET) == ""


def test_classification_routes_are_forwarded() -> None:
    assert ROUTES[("POST", "classify")] == "/classify"
    assert ROUTES[("POST", "classify_batch")] == "/classify_batch"
