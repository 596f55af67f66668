"""Logprobs over HTTP, parsed by the official clients: OpenAI completions (with echo) and chat, whole and
streamed, and LoRAX details (alternatives, top_tokens, prefill), their numbers checked against HF's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import lorax
import openai
import pytest
from engine_support import hf_log_probs
from lorax.types import StreamResponse
from openai.types.chat import ChatCompletionMessageParam
from server_support import LiveServingServer

from worker.serving.params import MAX_LOGPROBS

PROMPT = "The quick brown fox"
EXACT = {"ignore_eos": True}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=256) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _token_ids(
    server: LiveServingServer, adapter: str | None, prompt_ids: list[int], count: int
) -> list[int]:
    """The engine's own greedy tokens for the prompt (LoRAX details name them by id)."""
    body = {
        "inputs": server.engine.tokenizer.decode(prompt_ids, skip_special_tokens=True),
        "parameters": {
            "adapter_id": adapter,
            "max_new_tokens": count,
            "details": True,
            "ignore_eos_token": True,
        },
    }
    reply = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    return [token["id"] for token in reply["details"]["tokens"]]


def test_completion_logprobs_with_echo_match_hf(
    client: openai.OpenAI, server: LiveServingServer, tiny_model_dir: Path, adapter_root: Path
) -> None:
    tokenizer = server.engine.tokenizer
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])
    completion = client.completions.create(
        model="acme/1", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, echo=True, extra_body=EXACT
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert logprobs.text_offset is not None
    assert choice.text.startswith(PROMPT) and len(logprobs.tokens) == len(prompt_ids) + 8
    generated = _token_ids(server, "acme/1", prompt_ids, 8)
    reference = hf_log_probs(tiny_model_dir, adapter_root / "acme" / "1", prompt_ids + generated)
    ids = prompt_ids + generated
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, len(ids)):
        row = reference[p - 1]
        assert abs(logprobs.token_logprobs[p] - float(row[ids[p]])) < TOLERANCE
        top = logprobs.top_logprobs[p]
        assert top is not None and 3 <= len(top) <= 4  # the chosen token is always among them
        expected = sorted(row.topk(3).values.tolist(), reverse=True)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(expected, abs=TOLERANCE)
    # The prompt's tokens sit where their offsets say in the echoed text.
    for p in range(1, len(prompt_ids)):
        token, offset = logprobs.tokens[p], logprobs.text_offset[p]
        assert choice.text[offset : offset + len(token)] == token
    assert logprobs.text_offset[len(prompt_ids)] == len(PROMPT)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_streamed_completion_logprobs_equal_the_whole_ones(client: openai.OpenAI) -> None:
    kwargs = {"model": "", "prompt": [1, 504, 3458, 282], "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kwargs, echo=True, extra_body=EXACT)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**kwargs, echo=True, stream=True, extra_body=EXACT))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks]
    assert all(part is not None for part in streamed)
    tokens = [t for part in streamed for t in part.tokens or []]  # type: ignore[union-attr]
    values = [v for part in streamed for v in part.token_logprobs or []]  # type: ignore[union-attr]
    offsets = [o for part in streamed for o in part.text_offset or []]  # type: ignore[union-attr]
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens and offsets == whole.choices[0].logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(whole.choices[0].logprobs.token_logprobs[1:])  # type: ignore[index]
    # Without echo: one entry per generated token, the prompt's text not in front.
    plain = client.completions.create(**kwargs, extra_body=EXACT)  # type: ignore[call-overload]
    assert plain.choices[0].logprobs.tokens == whole.choices[0].logprobs.tokens[4:]  # type: ignore[index, union-attr]
    assert plain.choices[0].logprobs.text_offset[0] == 0  # type: ignore[index, union-attr]


def test_chat_logprobs_whole_and_streamed(
    client: openai.OpenAI, server: LiveServingServer, tiny_model_dir: Path
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is two plus two?"}]
    whole = client.chat.completions.create(
        model="",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=EXACT,
    )
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 6 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) for entry in content)
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    generated = _token_ids(server, None, prompt_ids, 6)
    reference = hf_log_probs(tiny_model_dir, None, prompt_ids + generated)
    for j, entry in enumerate(content):
        row = reference[len(prompt_ids) - 1 + j]
        assert abs(entry.logprob - float(row[generated[j]])) < TOLERANCE
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=TOLERANCE
        )
    chunks = list(
        client.chat.completions.create(
            model="",
            messages=messages,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body=EXACT,
        )
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    # Not asked: no logprobs.
    plain = client.chat.completions.create(model="", messages=messages, max_tokens=2, extra_body=EXACT)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": PROMPT, "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/generate", {"inputs": PROMPT, "parameters": {"top_n_tokens": MAX_LOGPROBS + 1}}, "top_n_tokens"),
        (
            "/generate",
            {"inputs": PROMPT, "parameters": {"return_k_alternatives": 99}},
            "return_k_alternatives",
        ),
    ],
)
def test_out_of_bounds_logprob_counts_are_refused_naming_the_field(
    server: LiveServingServer, path: str, body: dict[str, object], field: str
) -> None:
    if path == "/v1/chat/completions":
        body = body | {"messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    # The schema's bounds answer 422 (as every field's do here), the routes' own checks 400.
    assert response.status_code in (400, 422), response.text
    assert field in response.text


def test_lorax_details_prefill_alternatives_and_top_tokens(
    server: LiveServingServer, tiny_model_dir: Path, adapter_root: Path
) -> None:
    client = lorax.Client(server.url, timeout=60)
    tokenizer = server.engine.tokenizer
    response = client.generate(
        PROMPT,
        adapter_id="acme/2",
        max_new_tokens=5,
        details=True,
        decoder_input_details=True,
        return_k_alternatives=3,
        truncate=4,
        ignore_eos_token=True,
    )
    details = response.details
    assert details is not None
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])[-4:]
    assert [t.id for t in details.prefill] == prompt_ids
    ids = prompt_ids + [t.id for t in details.tokens]
    reference = hf_log_probs(tiny_model_dir, adapter_root / "acme" / "2", ids)
    assert details.prefill[0].logprob is None
    for p, token in enumerate(details.prefill[1:], start=1):
        assert token.logprob is not None and abs(token.logprob - float(reference[p - 1, ids[p]])) < TOLERANCE
        assert token.text == tokenizer.decode([ids[p]])
    for j, token in enumerate(details.tokens):
        row = reference[len(prompt_ids) - 1 + j]
        assert abs(token.logprob - float(row[token.id])) < TOLERANCE
        assert token.alternative_tokens is not None
        assert [a.id for a in token.alternative_tokens] == row.topk(3).indices.tolist()

    # TGI's top_n_tokens: details.top_tokens per position, and each stream event's top_tokens.
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 4, "details": True, "top_n_tokens": 2, "ignore_eos_token": True},
    }
    whole = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]
    assert [len(top) for top in whole["top_tokens"]] == [2] * 4
    assert all(
        set(entry) == {"id", "text", "logprob", "special"} for top in whole["top_tokens"] for entry in top
    )
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert [event["top_tokens"] for event in events] == whole["top_tokens"]
    # lorax-client's stream types read the events (and a token's alternatives, when asked).
    body["parameters"] |= {"return_k_alternatives": 2}  # type: ignore[operator]
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as stream:
        parsed = [
            StreamResponse(**json.loads(line[5:])) for line in stream.iter_lines() if line.startswith("data:")
        ]
    assert [len(r.token.alternative_tokens or []) for r in parsed] == [2] * 4
    assert parsed[-1].details is not None and parsed[-1].generated_text is not None
