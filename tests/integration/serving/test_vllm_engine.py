"""`tuneforge serve --engine vllm`: tuneforge's HTTP app in front of a real vLLM (the CPU build of
`make vllm`) serving smollm2-135m and PEFT adapters from an adapter directory.

One serving process for the module (vLLM takes ~30 s to start); the test that kills vLLM runs last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuneforge.serving_auth import TenantAssertions
from vllm_support import MODEL, assert_group_gone, free_port, lora, vllm_group, vllm_python, wait_healthy

SECRET = "vllm-engine-test-" + "k" * 32
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, there was a")
NEW_TOKENS = 8
MAX_LORA_RANK = 16
LAUNCH = Path(__file__).resolve().parents[3] / "worker" / "serving" / "vllm_engine" / "launch.py"


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    log: Path
    model_dir: Path
    adapters: Path
    assertions: TenantAssertions

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        content = json.dumps(body).encode()
        headers = self.assertions.headers(tenant="dev", method="POST", path=path, body=content)
        headers |= {"Content-Type": "application/json"}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=120, **kwargs)

    def get(self, path: str) -> httpx.Response:
        headers = self.assertions.headers(tenant="dev", method="GET", path=path)
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, shared_model_cache: Path) -> Iterator[Served]:
    python = vllm_python()
    from worker.training.base_models import resolve_base_model

    root = tmp_path_factory.mktemp("vllm-engine")
    model_dir = resolve_base_model(MODEL, shared_model_cache)
    adapters = root / "adapters"
    lora(model_dir, adapters / "acme" / "1", rank=8, seed=3)
    lora(model_dir, adapters / "wide" / "1", rank=2 * MAX_LORA_RANK, seed=4)
    lora(model_dir, adapters / "dora" / "1", rank=8, seed=5, dora=True)
    # A turbo_lora artifact: its LoRA and its speculator heads (which vLLM never reads, so any bytes do).
    turbo = shutil.copytree(adapters / "acme" / "1", adapters / "turbo" / "1")
    (turbo / "speculator_config.json").write_text("{}")
    (turbo / "speculator.safetensors").write_bytes(b"")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env |= {"TUNEFORGE_MODEL_CACHE_DIR": str(shared_model_cache), "TUNEFORGE_SECRET_KEY": SECRET}
    env |= {"TUNEFORGE_VLLM_PYTHON": str(python), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--engine", "vllm", "--base-model", MODEL]
    command += ["--port", str(port), "--adapter-dir", str(adapters), "--data-dir", str(root / "data")]
    command += ["--dtype", "fp32", "--max-lora-rank", str(MAX_LORA_RANK), "--parent-pid", str(os.getpid())]
    log = root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield Served(url, process, log, model_dir, adapters, TenantAssertions(SECRET))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def _greedy_reference(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    """Argmax decoding with the model's own forward pass, EOS ignored: what both engines must produce."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _generated_ids(served: Served, prompt: str, adapter: str | None) -> list[int]:
    parameters = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "details": True, "ignore_eos_token": True}
    if adapter:
        parameters["adapter_id"] = adapter
    reply = served.post("/generate", {"inputs": prompt, "parameters": parameters})
    assert reply.status_code == 200, reply.text
    return [token["id"] for token in reply.json()["details"]["tokens"]]


def test_greedy_output_of_base_and_adapter_equals_the_models_own_argmax(served: Served) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    base = AutoModelForCausalLM.from_pretrained(served.model_dir, dtype=torch.float32).eval()
    expected_base = [_greedy_reference(base, tokenizer, p) for p in PROMPTS]
    adapted = PeftModel.from_pretrained(base, served.adapters / "acme" / "1").eval()
    expected_adapter = [_greedy_reference(adapted, tokenizer, p) for p in PROMPTS]
    assert expected_adapter != expected_base  # the adapter changes the output, so the check below means it
    assert [_generated_ids(served, p, None) for p in PROMPTS] == expected_base
    assert [_generated_ids(served, p, "acme/1") for p in PROMPTS] == expected_adapter


def test_n_choices_penalties_and_logit_bias_reach_vllm(served: Served) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    body = {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 1.0, "seed": 9, "ignore_eos": True}
    three = served.post("/v1/completions", body | {"n": 3}).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2] and three["usage"]["completion_tokens"] == 18
    alone = served.post("/v1/completions", body | {"seed": 10}).json()
    assert alone["choices"][0]["text"] == three["choices"][1]["text"]  # choice j is seed + j
    token = tokenizer(" Paris", add_special_tokens=False)["input_ids"][-1]
    forced = served.post("/v1/completions", body | {"logit_bias": {str(token): 100}}).json()
    assert forced["choices"][0]["text"] == tokenizer.decode([token] * 6)
    greedy = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = _greedy_reference_shaped(served, PROMPTS[0], presence=1.5, frequency=0.5)
    reply = served.post(
        "/v1/completions", greedy | {"presence_penalty": 1.5, "frequency_penalty": 0.5}
    ).json()
    assert reply["choices"][0]["text"] == tokenizer.decode(expected)


def test_structured_output_and_logprobs_reach_vllm(served: Served) -> None:
    item = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "rank": {"type": "integer", "maximum": 9}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": item, "strict": True}}
    body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 1.0, "seed": 4, "response_format": fmt}
    reply = served.post("/v1/completions", body | {"n": 2})
    assert reply.status_code == 200, reply.text
    for choice in reply.json()["choices"]:
        jsonschema.validate(json.loads(choice["text"]), item)
    scored = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    logprobs = served.post("/v1/completions", scored).json()["choices"][0]["logprobs"]
    prompt_tokens = len(AutoTokenizer.from_pretrained(served.model_dir)(PROMPTS[0])["input_ids"])
    assert len(logprobs["tokens"]) == prompt_tokens + 3 and logprobs["token_logprobs"][0] is None
    assert all(len(top) >= 2 for top in logprobs["top_logprobs"][prompt_tokens:])


def _greedy_reference_shaped(served: Served, prompt: str, *, presence: float, frequency: float) -> list[int]:
    """Argmax decoding with OpenAI's penalties applied by hand to the model's own logits."""
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    model = AutoModelForCausalLM.from_pretrained(served.model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(ids).logits[0, -1].clone()
            for seen in set(out):
                logits[seen] -= presence + frequency * out.count(seen)
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_chat_completion_of_the_base_names_paris(served: Served) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = served.post("/v1/chat/completions", {"messages": messages, "max_tokens": 30, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


def test_streamed_text_equals_the_whole_response_and_stop_strings_cut_it(served: Served) -> None:
    body = {"model": "acme/1", "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = served.post("/v1/completions", body).json()["choices"][0]
    content = json.dumps(body | {"stream": True}).encode()
    headers = served.assertions.headers(tenant="dev", method="POST", path="/v1/completions", body=content)
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", content=content, timeout=60,
        headers=headers | {"Content-Type": "application/json"},
    ) as stream:  # fmt: skip
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"] for e in events[:-1]]
    assert "".join(c[0]["text"] for c in chunks if c) == whole["text"]
    assert whole["finish_reason"] == "length"
    stop = whole["text"][len(whole["text"]) // 2 :][:3]
    cut = served.post("/v1/completions", body | {"stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == whole["text"][: whole["text"].find(stop)]


def test_unknown_adapters_are_404_and_what_vllm_cannot_load_a_clear_422(served: Served) -> None:
    body = {"prompt": "Hello", "max_tokens": 2}
    for name in ("acme/9", "nobody/1", "not an id"):
        reply = served.post("/v1/completions", body | {"model": name})
        assert reply.status_code == 404, reply.text
    wide = served.post("/v1/completions", body | {"model": "wide/1"})
    assert wide.status_code == 422
    assert f"LoRA rank {2 * MAX_LORA_RANK}" in wide.json()["error"]["message"]
    assert f"up to {MAX_LORA_RANK}" in wide.json()["error"]["message"]
    dora = served.post("/generate", {"inputs": "Hello", "parameters": {"adapter_id": "dora/1"}})
    assert dora.status_code == 422 and "DoRA adapter" in dora.json()["error"], dora.text


def test_a_turbo_adapter_is_served_as_its_lora_and_says_speculation_is_off(served: Served) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    turbo = served.post("/v1/completions", body | {"model": "turbo/1"})
    lora = served.post("/v1/completions", body | {"model": "acme/1"})
    assert turbo.status_code == 200, turbo.text
    assert turbo.headers["x-tuneforge-speculation"].startswith("off; engine vllm")
    assert "x-tuneforge-speculation" not in lora.headers
    assert turbo.json()["choices"][0]["text"] == lora.json()["choices"][0]["text"]
    listed = {m["id"]: m for m in served.get("/v1/models").json()["data"]}
    assert listed["turbo/1"]["loaded"] is True


def _metric(served: Served, name: str) -> float:
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name))


def test_a_client_that_leaves_a_stream_aborts_the_request_in_vllm(served: Served) -> None:
    aborted = 'tuneforge_serving_requests_total{finish_reason="aborted"}'
    before = _metric(served, aborted)
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 1500, "ignore_eos_token": True}}
    content = json.dumps(body).encode()
    headers = served.assertions.headers(tenant="dev", method="POST", path="/generate_stream", body=content)
    with httpx.stream(
        "POST", f"{served.url}/generate_stream", content=content, timeout=60,
        headers=headers | {"Content-Type": "application/json"},
    ) as stream:  # fmt: skip
        events = (line for line in stream.iter_lines() if line.startswith("data:"))
        for _ in range(20):  # vLLM sets its gauges just after it hands out a step's tokens: read a few
            next(events)
        assert _metric(served, "vllm:num_requests_running") == 1
    # Left after one token: vLLM drops the request (run to its end, 1500 tokens would keep it running far
    # longer than this wait on this CPU). vLLM's gauge is all there is to watch from outside.
    deadline = time.monotonic() + 15
    while _metric(served, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(served, "vllm:num_requests_running") == 0
    assert _metric(served, aborted) == before + 1


def test_metrics_translate_vllms_counters_and_pass_its_own_through(served: Served) -> None:
    served.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["tuneforge_serving_generated_tokens_total"] >= 3
    assert values["tuneforge_serving_prompt_tokens_total"] >= 1
    assert values["tuneforge_serving_running_sequences"] == 0  # nothing in flight between requests
    assert values['tuneforge_serving_requests_total{finish_reason="length"}'] >= 1
    assert values['tuneforge_serving_requests_total{finish_reason="stop_sequence"}'] >= 1  # the stop test
    assert any(k.startswith("vllm:generation_tokens_total") for k in values)


def test_the_resolver_accepts_only_its_own_names_with_an_adapter_linked(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("vllm_launch", LAUNCH)
    assert spec is not None and spec.loader is not None
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)  # imports vLLM only when it runs: the stdlib part loads here
    name = "tf-" + "a" * 40
    (tmp_path / name).mkdir()
    assert launch.adapter_path(str(tmp_path), name) is None  # no adapter_config.json
    (tmp_path / name / "adapter_config.json").write_text("{}")
    assert launch.adapter_path(str(tmp_path), name) == str(tmp_path / name)
    for bad in ("../" + name, name + "/..", "tf-" + "A" * 40, "tf-abc", "acme/1", "/etc"):
        assert launch.adapter_path(str(tmp_path), bad) is None


def test_killing_vllm_fails_health_and_ends_the_process(served: Served) -> None:
    """Last in the module: it ends the shared process."""
    group = vllm_group(served.process.pid)
    os.kill(group, signal.SIGKILL)  # the launcher alone (it leads its group): its workers are orphaned
    assert served.process.wait(timeout=60) == 3, served.log.read_text()[-3000:]  # lifetime.EXIT_ENGINE_DIED
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served.url}/health", timeout=2)
    assert_group_gone(group)  # no vLLM process outlives its tuneforge serve
