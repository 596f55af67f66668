"""`lorax-client` against a live server: generate, generate_stream, `POST /`, health, metrics, disconnects."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import lorax
import pytest
from lorax.errors import NotFoundError, ValidationError
from server_support import TINY, LiveServingServer
from serving_support import make_random_heads

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> lorax.Client:
    return lorax.Client(server.url, timeout=60)


def _metric(server: LiveServingServer, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_generate_with_details(client: lorax.Client, server: LiveServingServer) -> None:
    response = client.generate(
        PROMPT, adapter_id="acme/1", max_new_tokens=7, details=True, ignore_eos_token=True
    )
    details = response.details
    assert details is not None and details.finish_reason == "length"
    assert details.generated_tokens == 7 and len(details.tokens) == 7 and details.seed is None
    assert details.prompt_tokens == len(server.engine.tokenizer(PROMPT)["input_ids"])
    assert response.generated_text == "".join(token.text for token in details.tokens)
    assert all(token.logprob <= 0 for token in details.tokens)


def test_prefill_details_and_truncation(client: lorax.Client, server: LiveServingServer) -> None:
    prompt_ids = list(server.engine.tokenizer(PROMPT)["input_ids"])
    response = client.generate(PROMPT, max_new_tokens=2, details=True, decoder_input_details=True)
    assert response.details is not None
    assert [token.id for token in response.details.prefill] == prompt_ids
    truncated = client.generate(PROMPT, max_new_tokens=2, details=True, truncate=2)
    assert truncated.details is not None and truncated.details.prompt_tokens == 2


def test_generate_stream_matches_generate(client: lorax.Client) -> None:
    kwargs = {"adapter_id": "acme/2", "max_new_tokens": 9, "ignore_eos_token": True}
    whole = client.generate(PROMPT, **kwargs)  # type: ignore[arg-type]
    events = list(client.generate_stream(PROMPT, details=True, **kwargs))  # type: ignore[arg-type]
    assert len(events) == 9
    assert "".join(event.token.text for event in events) == whole.generated_text
    assert all(event.generated_text is None for event in events[:-1])
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details is not None and events[-1].details.finish_reason == "length"


def test_stop_sequence_ends_generation(client: lorax.Client) -> None:
    text = client.generate(
        PROMPT, adapter_id="acme/3", max_new_tokens=16, ignore_eos_token=True
    ).generated_text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another prompt: {text!r}"
    stopped = client.generate(
        PROMPT,
        adapter_id="acme/3",
        max_new_tokens=16,
        stop_sequences=[stop],
        details=True,
        ignore_eos_token=True,
    )
    assert stopped.details is not None and stopped.details.finish_reason == "stop_sequence"
    assert stopped.generated_text == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_reports_its_seed(client: lorax.Client) -> None:
    def sample(seed: int | None) -> lorax.types.Response:
        return client.generate(
            PROMPT,
            do_sample=True,
            temperature=0.9,
            seed=seed,
            max_new_tokens=12,
            details=True,
            ignore_eos_token=True,
        )

    first, second = sample(42), sample(42)
    assert first.generated_text == second.generated_text
    assert first.details is not None and first.details.seed == 42
    unseeded = sample(None)
    assert unseeded.details is not None and unseeded.details.seed is not None  # drawn, so it can be replayed
    assert sample(unseeded.details.seed).generated_text == unseeded.generated_text


def test_return_full_text_prepends_the_prompt(client: lorax.Client) -> None:
    plain = client.generate(PROMPT, max_new_tokens=5, ignore_eos_token=True).generated_text
    full = client.generate(PROMPT, max_new_tokens=5, ignore_eos_token=True, return_full_text=True)
    assert full.generated_text == PROMPT + plain


def test_unknown_adapter_and_bad_parameters_raise_the_clients_errors(client: lorax.Client) -> None:
    with pytest.raises(NotFoundError, match="nobody/3"):
        client.generate(PROMPT, adapter_id="nobody/3", max_new_tokens=2)
    with pytest.raises(NotFoundError):
        list(client.generate_stream(PROMPT, adapter_id="nobody/3", max_new_tokens=2))
    with pytest.raises(ValidationError, match="typical_p"):
        client.generate(PROMPT, typical_p=0.5, max_new_tokens=2)


def test_post_root_returns_a_one_element_list_or_a_stream(server: LiveServingServer) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True, "ignore_eos_token": True}}
    listed = httpx.post(f"{server.url}/", json=body, timeout=30)
    assert listed.status_code == 200
    (item,) = listed.json()
    assert set(item) == {"generated_text", "details"} and item["details"]["generated_tokens"] == 3
    assert httpx.post(f"{server.url}/generate", json=body, timeout=30).json() == item

    with httpx.stream("POST", f"{server.url}/", json=body | {"stream": True}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = [json.loads(line.removeprefix("data:")) for line in lines]
    assert [set(e["token"]) for e in events] == [{"id", "text", "logprob", "special"}] * 3
    assert events[-1]["generated_text"] == item["generated_text"]


def test_health_and_metrics(client: lorax.Client, server: LiveServingServer) -> None:
    client.generate(PROMPT, adapter_id="acme/4", max_new_tokens=3)
    client.generate(PROMPT, adapter_id="acme/4", max_new_tokens=3)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["model"] == TINY
    text = httpx.get(f"{server.url}/metrics").text
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert f"tuneforge_serving_{histogram}_bucket{{" in text
        assert _metric(server, f"tuneforge_serving_{histogram}_count") > 0
    assert _metric(server, "tuneforge_serving_adapter_cache_misses_total") >= 1
    assert _metric(server, "tuneforge_serving_adapter_cache_hits_total") >= 1
    assert _metric(server, "tuneforge_serving_adapter_loads_total", '{outcome="loaded"}') >= 1
    assert "tuneforge_serving_running_sequences" in text and "tuneforge_serving_waiting_sequences" in text


def test_client_disconnect_mid_stream_aborts_the_request(server: LiveServingServer) -> None:
    aborted = '{finish_reason="aborted"}'
    aborted_before = _metric(server, "tuneforge_serving_requests_total", aborted)
    generated_before = _metric(server, "tuneforge_serving_generated_tokens_total")
    # Long enough that it would run for many seconds had the client stayed.
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1500, "ignore_eos_token": True}}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        assert _metric(server, "tuneforge_serving_running_sequences") == 1
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 10
    while _metric(server, "tuneforge_serving_requests_total", aborted) == aborted_before:
        assert time.monotonic() < deadline, "the disconnected request was never aborted"
        time.sleep(0.05)
    while _metric(server, "tuneforge_serving_running_sequences") != 0:
        assert time.monotonic() < deadline, "the aborted request still counts as running"
        time.sleep(0.05)
    assert _metric(server, "tuneforge_serving_generated_tokens_total") - generated_before < 1500


def test_client_leaving_a_whole_response_early_aborts_the_request(server: LiveServingServer) -> None:
    aborted = '{finish_reason="aborted"}'
    aborted_before = _metric(server, "tuneforge_serving_requests_total", aborted)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1500, "ignore_eos_token": True}}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/generate", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 10
    while _metric(server, "tuneforge_serving_requests_total", aborted) == aborted_before:
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.05)


def test_a_turbo_adapters_details_report_acceptance(server: LiveServingServer, adapter_root: Path) -> None:
    make_random_heads(adapter_root / "lorax-turbo" / "1", hidden_size=64, num_heads=3)
    body = {
        "inputs": PROMPT,
        "parameters": {"adapter_id": "lorax-turbo/1", "max_new_tokens": 9, "details": True,
                       "ignore_eos_token": True},
    }  # fmt: skip
    details = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]
    speculation = details["speculation"]
    assert details["generated_tokens"] == 9 and speculation["steps"] > 0
    assert 0 <= speculation["accepted_tokens"] <= speculation["drafted_tokens"]
    assert speculation["acceptance_rate"] == pytest.approx(
        speculation["accepted_tokens"] / speculation["drafted_tokens"], abs=1e-4
    )
    # A plain adapter's details have no speculation entry.
    plain = httpx.post(f"{server.url}/generate", json=body | {"parameters": body["parameters"] | {
        "adapter_id": "acme/1"}}, timeout=60).json()["details"]  # fmt: skip
    assert "speculation" not in plain


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("seed", "18446744073709551616"),
        ("temperature", "NaN"),
        ("top_p", "Infinity"),
        ("max_new_tokens", "1e30"),
        ("repetition_penalty", "0"),
        ("truncate", "1e12"),
        ("stop", json.dumps(["s"] * 9)),
    ],
)
def test_a_parameter_out_of_range_or_not_finite_is_422_naming_it(
    server: LiveServingServer, field: str, raw: str
) -> None:
    body = f'{{"inputs": "hello", "parameters": {{"max_new_tokens": 2, "{field}": {raw}}}}}'
    response = httpx.post(
        f"{server.url}/generate", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation" and field in response.json()["error"]
