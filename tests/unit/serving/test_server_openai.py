"""The official `openai` client against a live server: completions, chat, streaming, usage, errors, models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from server_support import TINY, LiveServingServer
from serving_support import make_random_heads

from worker.serving.params import DEFAULT_MAX_BODY_BYTES, MAX_MESSAGES, MAX_PROMPT_CHARS

# Small enough that an over-long prompt is cheap to build.
CONTEXT = 256
PROMPT = "The quick brown fox"
# The tiny model is random: without ignore_eos a completion could end at any length.
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=CONTEXT) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _greedy(client: openai.OpenAI, model: str, max_tokens: int = 12) -> openai.types.Completion:
    return client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=EXACT
    )


def test_completion_reports_usage_and_length(client: openai.OpenAI, server: LiveServingServer) -> None:
    completion = _greedy(client, "", max_tokens=9)
    prompt_tokens = len(server.engine.tokenizer(PROMPT)["input_ids"])
    assert completion.object == "text_completion" and completion.model == TINY
    assert completion.choices[0].finish_reason == "length" and completion.choices[0].text
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 9)
    assert completion.usage.total_tokens == prompt_tokens + 9


def test_streamed_completion_matches_the_whole_one(client: openai.OpenAI) -> None:
    whole = _greedy(client, "acme/1")
    chunks = list(
        client.completions.create(
            model="acme/1",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage

    continuous = client.completions.create(
        model="acme/1",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT | {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    counts = [c.usage.completion_tokens for c in continuous if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 12 and len(counts) == len(chunks)


def test_token_id_prompt_equals_the_string_prompt(client: openai.OpenAI, server: LiveServingServer) -> None:
    ids = list(server.engine.tokenizer(PROMPT)["input_ids"])
    by_ids = client.completions.create(model="", prompt=ids, max_tokens=12, temperature=0, extra_body=EXACT)
    assert by_ids.choices[0].text == _greedy(client, "").choices[0].text


def test_adapters_and_base_give_different_text(client: openai.OpenAI) -> None:
    texts = {model: _greedy(client, model).choices[0].text for model in ("", "acme/1", "acme/2", "acme/3")}
    assert len(set(texts.values())) == 4, texts
    # The base model's own name means "no adapter", like "".
    assert _greedy(client, TINY).choices[0].text == texts[""]


def test_chat_completion_and_its_stream(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is two plus two?"}]
    whole = client.chat.completions.create(
        model="acme/2",
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body=EXACT,
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model="acme/2",
            messages=messages,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            extra_body=EXACT,
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_sse_stream_is_openai_framed_and_ends_with_done(server: LiveServingServer) -> None:
    body = {"model": "", "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0} | EXACT
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event.removeprefix("data: "))
        assert set(chunk) == {"id", "object", "created", "model", "choices"}


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    def sample() -> str:
        completion = client.completions.create(
            model="acme/3", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, extra_body=EXACT
        )
        return completion.choices[0].text

    assert sample() == sample()


def test_stop_string_ends_the_completion_and_is_left_out(client: openai.OpenAI) -> None:
    text = _greedy(client, "acme/1", max_tokens=16).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another prompt: {text!r}"
    stopped = client.completions.create(
        model="acme/1", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body=EXACT
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


async def _completion(client: openai.AsyncOpenAI, **kwargs: object) -> openai.types.Completion:
    return await client.completions.create(max_tokens=16, temperature=0, extra_body=EXACT, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_unknown_adapter_is_404_while_the_batch_completes(server: LiveServingServer) -> None:
    async def run() -> list[object]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = ["acme/1", "nobody/7", "acme/4", "", "acme/2"]
        return await asyncio.gather(
            *(_completion(client, model=m, prompt=PROMPT) for m in models), return_exceptions=True
        )

    results = asyncio.run(run())
    assert isinstance(results[1], openai.NotFoundError) and "nobody/7" in str(results[1])
    for result in results[:1] + results[2:]:
        assert isinstance(result, openai.types.Completion), result
        assert result.usage is not None and result.usage.completion_tokens == 16


def test_over_long_prompt_is_400_and_fails_alone(server: LiveServingServer) -> None:
    async def run() -> tuple[object, object]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        long_prompt = [1] * (CONTEXT + 10)
        return await asyncio.gather(
            _completion(client, model="acme/1", prompt=PROMPT),
            _completion(client, model="acme/1", prompt=long_prompt),
            return_exceptions=True,
        )

    good, bad = asyncio.run(run())
    assert isinstance(bad, openai.BadRequestError) and str(CONTEXT) in str(bad)
    assert isinstance(good, openai.types.Completion) and good.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.5), ("top_p", 1.5), ("n", 0), ("logprobs", 21), ("max_tokens", 0), ("best_of", 0)],
)
def test_invalid_or_unsupported_parameter_is_4xx_naming_the_field(
    client: openai.OpenAI, field: str, value: object
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="", prompt=PROMPT, extra_body={field: value})
    assert 400 <= caught.value.status_code < 500
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == field and field in error["message"]


def test_chat_with_an_unknown_adapter_streaming_is_a_404_before_any_chunk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="acme/99", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
        )


def test_models_lists_the_base_model_and_every_adapter(client: openai.OpenAI) -> None:
    _greedy(client, "acme/4", max_tokens=1)  # loaded now
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {TINY, "acme/1", "acme/2", "acme/3", "acme/4"}
    assert models["acme/4"].model_extra is not None and models["acme/4"].model_extra["parent"] == TINY
    assert models["acme/4"].model_extra["loaded"] is True


def test_a_model_that_is_no_adapter_id_is_a_404_naming_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"


def test_a_malformed_body_is_a_422_naming_the_field(server: LiveServingServer) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"content": "hi"}]})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "messages[0].role"
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]["message"]


def test_a_turbo_adapters_usage_reports_its_drafts(
    client: openai.OpenAI, server: LiveServingServer, adapter_root: Path
) -> None:
    make_random_heads(adapter_root / "openai-turbo" / "1", hidden_size=64, num_heads=3)
    response = client.completions.create(
        model="openai-turbo/1", prompt=PROMPT, max_tokens=10, temperature=0, extra_body=EXACT
    )
    usage = response.usage
    assert usage is not None and usage.completion_tokens == 10
    assert usage.completion_tokens_details is not None
    accepted = usage.completion_tokens_details.accepted_prediction_tokens
    rejected = usage.completion_tokens_details.rejected_prediction_tokens
    assert accepted is not None and rejected is not None and accepted + rejected > 0
    speculation = (usage.model_extra or {})["speculation"]
    assert speculation["accepted_tokens"] == accepted
    assert speculation["drafted_tokens"] == accepted + rejected
    assert speculation["mean_accepted_length"] >= 1.0
    plain = client.completions.create(model="acme/1", prompt=PROMPT, max_tokens=4, extra_body=EXACT)
    assert plain.usage is not None and plain.usage.completion_tokens_details is None


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("seed", "18446744073709551616"),
        ("seed", "-9223372036854775809"),
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("temperature", "1e400"),
        ("top_p", "-Infinity"),
        ("max_tokens", "1e30"),
        ("max_tokens", "10000000000000"),
        ("top_k", "1099511627776"),
        ("repetition_penalty", "1e-300"),
        ("frequency_penalty", "NaN"),
        ("n", "1e9"),
        ("stop", json.dumps(["s"] * 9)),
        ("stop", json.dumps("x" * 300)),
        ("prompt", "[1, 2, 1099511627776]"),
        ("prompt", json.dumps("x" * (MAX_PROMPT_CHARS + 1))),
    ],
)
def test_a_number_out_of_range_or_not_finite_is_422_naming_the_field(
    server: LiveServingServer, field: str, raw: str
) -> None:
    """Python's json reads NaN, Infinity and 1e400 (inf); none may reach the engine thread."""
    body = f'{{"prompt": "hello", "max_tokens": 4, "{field}": {raw}}}'  # later keys win
    response = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_chat_messages_and_their_parts_are_bounded(server: LiveServingServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    many = {"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1), "max_tokens": 2}
    assert httpx.post(url, json=many, timeout=30).json()["error"]["param"] == "messages"
    long = {"messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}], "max_tokens": 2}
    response = httpx.post(url, json=long, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["param"] == "messages[0].content"


def test_a_body_over_the_limit_is_413_in_each_apis_error_shape(server: LiveServingServer) -> None:
    big = b'{"prompt": "' + b"x" * (DEFAULT_MAX_BODY_BYTES + 1) + b'"}'
    headers = {"content-type": "application/json"}
    openai_style = httpx.post(f"{server.url}/v1/completions", content=big, headers=headers, timeout=30)
    assert openai_style.status_code == 413 and openai_style.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    lorax_style = httpx.post(f"{server.url}/generate", content=chunked(), headers=headers, timeout=30)
    assert lorax_style.status_code == 413 and lorax_style.json()["error_type"] == "validation"
    assert _greedy(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x"), "", max_tokens=2).choices
