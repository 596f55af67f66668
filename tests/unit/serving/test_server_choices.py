"""n, best_of, prompt lists, penalties and logit_bias through the official `openai` client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_support import LiveServingServer

from worker.serving.choices import best_of, cumulative_logprob
from worker.serving.kv_cache import CacheShape
from worker.serving.outputs import FinishReason, TokenOutput
from worker.serving.params import MAX_CHOICES, MAX_LOGIT_BIAS_ENTRIES, MAX_PROMPTS

PROMPT = "The quick brown fox"
EXACT = {"ignore_eos": True}
# tiny-random-llama: 2 layers, 2 KV heads of 16 dims, fp32; 64 blocks of 16 tokens.
SMALL_CACHE = CacheShape(2, 2, 16, __import__("torch").float32).bytes_per_token * 64 * 16


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(
        tiny_model_dir, adapter_root, max_model_len=256, kv_cache_bytes=SMALL_CACHE
    ) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def prompt_tokens_computed(server: LiveServingServer) -> float:
    return float(server.engine.metrics.prompt_tokens._value.get())


def sampled(client: openai.OpenAI, **kwargs: Any) -> openai.types.Completion:
    settings: dict[str, Any] = {
        "model": "",
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
    }
    return client.completions.create(**(settings | kwargs), extra_body=EXACT)


def test_n_choices_come_from_one_prefill_and_are_reproducible(
    client: openai.OpenAI, server: LiveServingServer
) -> None:
    prompt_tokens = len(server.engine.tokenizer(PROMPT)["input_ids"])
    before = prompt_tokens_computed(server)
    four = sampled(client, n=4)
    assert prompt_tokens_computed(server) - before == prompt_tokens  # not 4x: the prompt ran once
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert len({c.text for c in four.choices}) == 4
    assert four.usage is not None
    assert (four.usage.prompt_tokens, four.usage.completion_tokens) == (prompt_tokens, 32)
    assert [c.text for c in sampled(client, n=4).choices] == [c.text for c in four.choices]
    assert sampled(client, n=1).choices[0].text == four.choices[0].text
    assert sampled(client, n=1, seed=12).choices[0].text == four.choices[1].text  # choice j: seed + j


def test_chat_n_streams_every_choice_by_index(client: openai.OpenAI) -> None:
    settings: dict[str, Any] = {
        "model": "acme/1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 3,
        "n": 3,
    }
    whole = client.chat.completions.create(**settings, extra_body=EXACT)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = ["", "", ""]
    finished = []
    for chunk in client.chat.completions.create(**settings, stream=True, extra_body=EXACT):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert texts == [c.message.content for c in whole.choices]
    assert sorted(finished) == [0, 1, 2]


def test_best_of_returns_the_n_best_of_the_same_choices(client: openai.OpenAI) -> None:
    four = sampled(client, n=4)
    best = sampled(client, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    assert {c.text for c in best.choices} <= {c.text for c in four.choices}
    assert best.usage is not None and best.usage.completion_tokens == 32  # all four were generated


def _outputs(logprobs: list[float], choice: int) -> list[TokenOutput]:
    return [
        TokenOutput(
            token_id=5, text="x", logprob=lp, special=False, index=i, choice=choice,
            finish_reason=FinishReason.LENGTH if i == len(logprobs) - 1 else None,
        )
        for i, lp in enumerate(logprobs)
    ]  # fmt: skip


def test_best_of_ranks_by_cumulative_logprob_per_prompt() -> None:
    # Two prompts, best_of 3: the cumulative logprobs are -3, -1, -2 and -0.5, -4, -0.6.
    sums = [[-1.0, -2.0], [-0.5, -0.5], [-1.5, -0.5], [-0.5], [-2.0, -2.0], [-0.3, -0.3]]
    generated = {index: _outputs(lps, index % 3) for index, lps in enumerate(sums)}
    kept = best_of(generated, prompts=2, best=3, n=2)
    assert sorted(kept) == [0, 1, 2, 3]
    assert [cumulative_logprob(kept[i]) for i in range(4)] == [-1.0, -2.0, -0.5, pytest.approx(-0.6)]


def test_a_prompt_list_gives_n_choices_per_prompt_in_order(
    client: openai.OpenAI, server: LiveServingServer
) -> None:
    prompts = [PROMPT, "Hello there", "A third one"]
    listed = sampled(client, prompt=prompts, n=2)
    assert [c.index for c in listed.choices] == list(range(6))
    for p, text in enumerate(prompts):
        alone = sampled(client, prompt=text, n=2)
        assert [c.text for c in listed.choices[2 * p : 2 * p + 2]] == [c.text for c in alone.choices]
    lengths = [len(server.engine.tokenizer(p)["input_ids"]) for p in prompts]
    assert listed.usage is not None
    assert (listed.usage.prompt_tokens, listed.usage.completion_tokens) == (sum(lengths), 6 * 8)

    ids = [server.engine.tokenizer(p)["input_ids"] for p in prompts[:2]]
    assert [c.text for c in sampled(client, prompt=ids).choices] == [
        listed.choices[0].text,
        listed.choices[2].text,
    ]

    texts = [""] * 6
    stream = client.completions.create(
        model="", prompt=prompts, n=2, max_tokens=8, temperature=1.0, seed=11, stream=True,
        stream_options={"include_usage": True}, extra_body=EXACT,
    )  # fmt: skip
    chunks = list(stream)
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in listed.choices]
    assert chunks[-1].usage == listed.usage


def test_logit_bias_forces_a_token_and_penalties_change_the_text(
    client: openai.OpenAI, server: LiveServingServer
) -> None:
    token = server.engine.tokenizer(" fox", add_special_tokens=False)["input_ids"][-1]
    forced = client.completions.create(
        model="", prompt=PROMPT, max_tokens=5, temperature=1.0, logit_bias={str(token): 100}, extra_body=EXACT
    )
    assert forced.choices[0].text == server.engine.tokenizer.decode([token] * 5)
    greedy = {"model": "", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**greedy, extra_body=EXACT).choices[0].text
    penalised = client.completions.create(
        **greedy, frequency_penalty=2.0, presence_penalty=2.0, extra_body=EXACT
    )
    assert penalised.choices[0].text != plain


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("n", {"n": MAX_CHOICES + 1}),
        ("n", {"prompt": ["a"] * 2, "n": MAX_CHOICES // 2 + 1}),
        ("best_of", {"n": 3, "best_of": 2}),
        ("best_of", {"n": 1, "best_of": 2, "stream": True}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -3}),
        ("logit_bias", {"logit_bias": {"12": 101}}),
        ("logit_bias", {"logit_bias": {"fox": 1}}),
        ("logit_bias", {"logit_bias": {"-3": 1}}),
        ("logit_bias", {"logit_bias": {"32000000": 1}}),
        ("logit_bias", {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}}),
        ("prompt", {"prompt": ["a"] * (MAX_PROMPTS + 1)}),
        ("prompt", {"prompt": ["a", ""]}),
        ("n", {"n": 10, "max_tokens": 200}),  # 10 choices of up to 13 blocks: more than half the cache
        ("n", {"n": 17}),  # more than half the batch's 32 slots
    ],
)
def test_bad_choices_penalties_and_biases_are_4xx_naming_the_field(
    server: LiveServingServer, field: str, body: dict[str, Any]
) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path.endswith("chat/completions") and ("prompt" in body or "best_of" in body):
            continue
        request = {"prompt": "hello", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | body
        response = httpx.post(f"{server.url}{path}", json=request, timeout=30)
        assert response.status_code in (400, 422), response.text
        error = response.json()["error"]
        assert error["param"].startswith(field) and field in error["message"], error


def test_a_big_n_is_refused_while_other_tenants_are_served(server: LiveServingServer) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            big = {"prompt": PROMPT, "n": 10, "max_tokens": 200, "ignore_eos": True}
            small = {"prompt": PROMPT, "n": 2, "max_tokens": 8, "ignore_eos": True}
            return list(
                await asyncio.gather(
                    http.post("/v1/completions", json=big), http.post("/v1/completions", json=small)
                )
            )

    big, small = asyncio.run(run())
    assert big.status_code == 400 and big.json()["error"]["param"] == "n"
    assert "KV-cache" in big.json()["error"]["message"]
    assert small.status_code == 200 and len(small.json()["choices"]) == 2


def test_a_client_leaving_a_stream_of_several_choices_aborts_them_all(server: LiveServingServer) -> None:
    body = {"prompt": [PROMPT, "Hello"], "n": 3, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    engine = server.engine.engine
    for _ in range(100):
        if not engine.has_unfinished:
            break
        __import__("time").sleep(0.05)
    assert not engine.has_unfinished
    assert engine.blocks.num_used == 0
