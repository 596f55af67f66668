"""One serving suite, both engines: a smollm2-135m deployment on tuneforge's engine and on vLLM serves
adapters from tuneforge storage, through the control plane's proxy, to the clients users bring.

The official `openai` client (chat, streamed chat, completions, models), `lorax-client` (generate,
generate_stream), the Predibase SDK's deployment client and plain HTTP see the same behaviour from
either engine: the base model answers, each adapter changes the answer exactly as PEFT says it should,
unknown and other tenants' adapters are 404s, and a deleted version stops being served.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from live_server import LiveServer
from tests_support import assert_error, children_running
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuneforge import Tuneforge
from version_artifacts import peft_adapter

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m"
DEPLOYMENT = "chat"
PROMPT = "The three primary colors are"
NEW_TOKENS = 8
VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


@dataclass
class EngineStack:
    engine: str
    server: LiveServer
    tenant: str
    token: str
    other_token: str
    client: Tuneforge
    adapters: dict[str, Path]  # adapter id -> its PEFT directory

    def proxy_url(self) -> str:
        return f"{self.server.url}/{self.tenant}/deployments/v2/llms/{DEPLOYMENT}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


def _engine_settings(engine: str) -> dict[str, Any]:
    if engine == "tuneforge":
        return {}
    if not VLLM_PYTHON.exists():
        pytest.fail(f"vLLM's environment is missing ({VLLM_PYTHON}): run `make vllm` (make test does)")
    # fp32 as tuneforge's engine serves here, so both compare to PEFT token for token.
    return {"vllm_python": VLLM_PYTHON, "vllm_dtype": "float32", "vllm_max_model_len": 2048}


@pytest.fixture(scope="module", params=["tuneforge", "vllm"])
def stack(
    request: pytest.FixtureRequest,
    stack_settings_factory: Callable[..., Any],
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EngineStack]:
    from worker.training.base_models import resolve_base_model

    engine = request.param
    settings = stack_settings_factory(
        "embedded", model_cache_dir=shared_model_cache, **_engine_settings(engine)
    )
    base_dir = resolve_base_model(BASE, shared_model_cache)
    before = {p.pid for p in children_running("tuneforge.cli", recursive=True)}
    with LiveServer(settings) as server:
        tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
        token, other_token = server.mint_token(tenant), server.mint_token(other)
        client = Tuneforge(api_token=token, base_url=server.url)
        adapters = {}
        for repo, seed in (("colors", 3), ("shapes", 4)):
            local = peft_adapter(base_dir, tmp_path_factory.mktemp(repo) / "a", seed=seed, base_model=BASE)
            adapters[client.adapters.upload(local, repo=repo).id] = local
        made = client.deployments.create(
            DEPLOYMENT, config={"baseModel": BASE, "engine": engine}, timeout=300
        )
        assert made.status == "ready", client.deployments.events(DEPLOYMENT)
        yield EngineStack(engine, server, tenant, token, other_token, client, adapters)
        client.close()
        ours = [p for p in children_running("tuneforge.cli", recursive=True) if p.pid not in before]
        ours += [c for p in ours for c in p.children(recursive=True)]  # vLLM's processes, for that engine
    # The control plane stopped: no serving process it started (nor vLLM under one) outlives it.
    _, alive = psutil.wait_procs(ours, timeout=60)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


@pytest.fixture(scope="module")
def peft_greedy(shared_model_cache: Path) -> Callable[[Path | None], str]:
    """What HF (and PEFT, for an adapter) generate greedily for PROMPT: the answer both engines owe."""
    from peft import PeftModel

    from worker.training.base_models import resolve_base_model

    base_dir = resolve_base_model(BASE, shared_model_cache)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    answers: dict[Path | None, str] = {}

    def greedy(adapter: Path | None) -> str:
        if adapter not in answers:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter)
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            answers[adapter] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return answers[adapter]

    return greedy


def test_openai_chat_completions_stream_and_models(stack: EngineStack) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=stack.proxy_url() + "/v1", api_key=stack.token)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = openai.chat.completions.create(model="", messages=question, max_tokens=20, temperature=0)
    assert "Paris" in (answer.choices[0].message.content or ""), answer
    for adapter_id in stack.adapters:
        chunks = openai.chat.completions.create(
            model=adapter_id, messages=question, max_tokens=6, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = openai.completions.create(model="colors/1", prompt=PROMPT, max_tokens=5, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert set(stack.adapters) <= {m.id for m in openai.models.list()}


def test_each_adapter_answers_as_peft_does(
    stack: EngineStack, peft_greedy: Callable[[Path | None], str]
) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=stack.proxy_url() + "/v1", api_key=stack.token)
    answers = {}
    for adapter_id, local in [("", None), *stack.adapters.items()]:
        completion = openai.completions.create(
            model=adapter_id, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
        )
        answers[adapter_id] = completion.choices[0].text
        assert answers[adapter_id] == peft_greedy(local), (stack.engine, adapter_id)
    assert len(set(answers.values())) == 3, f"each adapter must change the answer: {answers}"


def test_lorax_client_generates_and_streams(stack: EngineStack) -> None:
    from lorax import Client

    lorax = Client(stack.proxy_url(), headers=stack.auth(), timeout=120)
    whole = lorax.generate(PROMPT, adapter_id="shapes/1", max_new_tokens=NEW_TOKENS)
    assert whole.details.generated_tokens == NEW_TOKENS
    streamed = list(lorax.generate_stream(PROMPT, adapter_id="shapes/1", max_new_tokens=NEW_TOKENS))
    assert "".join(r.token.text for r in streamed) == whole.generated_text
    assert streamed[-1].generated_text == whole.generated_text


def test_the_predibase_sdk_deployment_client_generates(
    stack: EngineStack, monkeypatch: pytest.MonkeyPatch, peft_greedy: Callable[[Path | None], str]
) -> None:
    from predibase import Predibase

    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.server.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", stack.token)
    lorax = Predibase().deployments.client(DEPLOYMENT, serving_url_override=stack.server.url)
    answer = lorax.generate(PROMPT, adapter_id="colors/1", max_new_tokens=NEW_TOKENS)
    assert answer.generated_text == peft_greedy(stack.adapters["colors/1"])


def test_unknown_and_other_tenants_adapters_are_not_found(stack: EngineStack) -> None:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "nope/1", "max_new_tokens": 2}}
    assert_error(httpx.post(stack.proxy_url(), json=body, headers=stack.auth(), timeout=60), 404, "not found")
    their_client = Tuneforge(api_token=stack.other_token, base_url=stack.server.url)
    their_client.deployments.create("theirs", config={"baseModel": BASE, "engine": stack.engine}, timeout=300)
    their_url = their_client.deployments.openai_compatible_endpoint("theirs").removesuffix("/v1")
    body["parameters"]["adapter_id"] = "colors/1"  # the first tenant's adapter, asked for by another
    response = httpx.post(their_url, json=body, headers=stack.auth(stack.other_token), timeout=60)
    assert_error(response, 404, "not found")
    their_client.close()


def test_a_deleted_version_stops_being_served(
    stack: EngineStack, tmp_path: Path, shared_model_cache: Path
) -> None:
    from worker.training.base_models import resolve_base_model

    local = peft_adapter(
        resolve_base_model(BASE, shared_model_cache), tmp_path / "gone", seed=9, base_model=BASE
    )
    version = stack.client.adapters.upload(local, repo="fleeting")
    body = {"inputs": PROMPT, "parameters": {"adapter_id": version.id, "max_new_tokens": 2}}
    served = httpx.post(stack.proxy_url(), json=body, headers=stack.auth(), timeout=120)
    assert served.status_code == 200, served.text
    stack.client.adapters.delete(version.id)
    deadline = time.monotonic() + 30
    while (
        response := httpx.post(stack.proxy_url(), json=body, headers=stack.auth(), timeout=60)
    ).status_code == 200:
        assert time.monotonic() < deadline, "a deleted version was still served after 30 s"
        time.sleep(0.5)
    assert_error(response, 404, "not found")
