"""Serving through the control plane: a live server whose supervisor runs a real `tuneforge serve`.

An adapter uploaded through the API is served by a `tiny-random-llama` deployment and reached with
tuneforge's client, the real Predibase SDK and the openai package, all through the proxy URL
`{server}/{tenant}/deployments/v2/llms/{name}`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live_server import LiveServer
from peft import LoraConfig, get_peft_model
from tests_support import assert_error, process_alive
from transformers import AutoModelForCausalLM
from tuneforge import NotFoundError, Tuneforge

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"
DEPLOYMENT = "tiny"
PROMPT = "The quick brown fox"


@dataclass
class ServingStack:
    server: LiveServer
    tenant: str
    token: str
    other_tenant: str
    other_token: str
    client: Tuneforge
    other_client: Tuneforge

    def proxy_url(self, name: str = DEPLOYMENT, tenant: str | None = None) -> str:
        return f"{self.server.url}/{tenant or self.tenant}/deployments/v2/llms/{name}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    @property
    def serving(self) -> Any:
        return self.server.app.state.serving


def _make_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A PEFT LoRA whose B matrices are random (not PEFT's zeros), so it changes what is generated."""
    torch.manual_seed(7)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = TINY  # the name the version is served under
    config_path.write_text(json.dumps(config))
    return out_dir


@pytest.fixture(scope="module", params=["embedded", "postgres_s3"])
def stack(
    request: pytest.FixtureRequest,
    stack_settings_factory: Callable[..., Any],
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServingStack]:
    from worker.training.base_models import resolve_base_model

    missing = tmp_path_factory.mktemp("no-model") / "missing-model"  # a base model that cannot start
    settings = stack_settings_factory(
        request.param,
        model_cache_dir=shared_model_cache,
        extra_base_models=[str(missing)],
        serving_unresponsive_seconds=5,
        serving_stop_timeout_seconds=2,
    )
    with LiveServer(settings) as server:
        tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
        token, other_token = server.mint_token(tenant), server.mint_token(other)
        client = Tuneforge(api_token=token, base_url=server.url)
        other_client = Tuneforge(api_token=other_token, base_url=server.url)
        adapter = _make_adapter(
            resolve_base_model(TINY, shared_model_cache), tmp_path_factory.mktemp("adapter") / "a"
        )
        assert client.adapters.upload(adapter, repo="acme").id == "acme/1"
        deployment = client.deployments.create(DEPLOYMENT, config={"baseModel": TINY}, timeout=180)
        assert deployment.status == "ready"
        yield ServingStack(server, tenant, token, other, other_token, client, other_client)
        client.close()
        other_client.close()


def test_tuneforge_client_generates_with_the_adapter_as_the_serving_process_does(stack: ServingStack) -> None:
    serving = stack.client.deployments.client(DEPLOYMENT)
    base = serving.generate(PROMPT, max_new_tokens=8)
    tuned = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=8)
    assert base.details is not None and base.details.generated_tokens == 8
    assert tuned.generated_text != base.generated_text, "the adapter must change the greedy output"
    # The proxy adds nothing and loses nothing: the serving process itself answers the same.
    url = stack.serving.ensure_started(TINY).url + "/generate"
    parameters = {"adapter_id": "acme/1", "max_new_tokens": 8}
    body = json.dumps({"inputs": PROMPT, "parameters": parameters}).encode()
    signed = stack.serving.signed_headers(stack.tenant, "POST", url, body)
    direct = httpx.post(url, content=body, headers=signed | {"Content-Type": "application/json"}, timeout=60)
    assert direct.status_code == 200, direct.text
    assert direct.json()["generated_text"] == tuned.generated_text


def test_generate_stream_yields_tokens_that_make_up_the_generated_text(stack: ServingStack) -> None:
    serving = stack.client.deployments.client(DEPLOYMENT)
    whole = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=12).generated_text
    tokens = list(serving.generate_stream(PROMPT, adapter_id="acme/1", max_new_tokens=12))
    assert len(tokens) == 12
    assert "".join(t.token.text for t in tokens) == whole
    assert tokens[-1].generated_text == whole and all(t.generated_text is None for t in tokens[:-1])


def _event_arrivals(url: str, headers: Callable[[str, bytes], dict[str, str]], tokens: int) -> list[float]:
    """When each Server-Sent Event of a `generate_stream` arrived, in seconds from the first one."""
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": tokens}}).encode()
    arrivals: list[float] = []
    url += "/generate_stream"
    sent = headers(url, body) | {"Content-Type": "application/json"}
    with httpx.stream("POST", url, content=body, headers=sent, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == tokens
    return [moment - arrivals[0] for moment in arrivals]


def test_a_proxied_stream_arrives_incrementally(stack: ServingStack) -> None:
    tokens = 600
    direct = _event_arrivals(
        stack.serving.ensure_started(TINY).url,
        lambda url, body: stack.serving.signed_headers(stack.tenant, "POST", url, body),
        tokens,
    )
    proxied = _event_arrivals(stack.proxy_url(), lambda url, body: stack.auth(), tokens)
    # Buffered, every event would arrive at once at the end; relayed as produced, the events spread
    # over the generation as they do straight from the serving process.
    assert direct[-1] > 0.05, "the generation is too quick to tell streaming from buffering"
    assert proxied[-1] > 0.3 * direct[-1], (proxied[-1], direct[-1])
    assert proxied[tokens // 2] > 0.1 * direct[-1], "the first half came in one burst"


def test_lorax_post_to_the_deployment_url_returns_a_one_element_list(stack: ServingStack) -> None:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "acme/1", "max_new_tokens": 4}}
    response = httpx.post(stack.proxy_url(), json=body, headers=stack.auth(), timeout=60)
    assert response.status_code == 200, response.text
    assert isinstance(response.json(), list) and len(response.json()) == 1
    assert response.json()[0]["generated_text"]


def test_predibase_sdk_creates_lists_and_generates_through_serving_url_override(
    stack: ServingStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from predibase import Predibase
    from predibase.config import DeploymentConfig

    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.server.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", stack.token)
    pb = Predibase()
    made = pb.deployments.create("sdk-made", config=DeploymentConfig(base_model=TINY))
    assert made.status == "ready" and made.model == TINY
    assert {"smollm2-135m", DEPLOYMENT, "sdk-made"} <= {d.name for d in pb.deployments.list()}
    assert pb.deployments.get(DEPLOYMENT).status == "ready"

    # The SDK puts the tenant's short code in the path; the proxy accepts it for the caller's tenant.
    lorax = pb.deployments.client(DEPLOYMENT, serving_url_override=stack.server.url)
    expected = stack.client.deployments.client(DEPLOYMENT).generate(
        PROMPT, adapter_id="acme/1", max_new_tokens=8
    )
    answer = lorax.generate(PROMPT, adapter_id="acme/1", max_new_tokens=8)
    assert answer.generated_text == expected.generated_text
    # A fresh client: once a generate succeeded, the SDK's generate_stream wrapper (2025.10) yields
    # every token twice (it does not return after its `_ready` shortcut).
    fresh = pb.deployments.client(DEPLOYMENT, serving_url_override=stack.server.url)
    streamed = [r.token.text for r in fresh.generate_stream(PROMPT, adapter_id="acme/1", max_new_tokens=8)]
    assert "".join(streamed) == expected.generated_text
    pb.deployments.delete("sdk-made")


def test_openai_client_completes_and_chats_through_the_proxy(stack: ServingStack) -> None:
    from openai import OpenAI

    endpoint = stack.client.deployments.openai_compatible_endpoint(DEPLOYMENT)
    assert endpoint == stack.proxy_url() + "/v1"
    openai = OpenAI(base_url=endpoint, api_key=stack.token)
    completion = openai.completions.create(model="acme/1", prompt=PROMPT, max_tokens=5, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    chunks = openai.chat.completions.create(
        model="acme/1", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "acme/1" in [m.id for m in openai.models.list()]


def test_embeddings_through_the_proxy_with_tuneforge_openai_lorax_and_the_predibase_sdk(
    stack: ServingStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from openai import OpenAI
    from predibase import Predibase

    deployment = stack.client.deployments.client(DEPLOYMENT)
    adapted, base = deployment.embed([PROMPT, "hello"], adapter_id="acme/1"), deployment.embed(PROMPT)
    assert len(adapted) == 2 and len(base) == 1 and adapted[0] != base[0]
    openai = OpenAI(base_url=stack.proxy_url() + "/v1", api_key=stack.token)
    response = openai.embeddings.create(model="acme/1", input=[PROMPT, "hello"], encoding_format="float")
    assert [item.embedding for item in response.data] == adapted
    lorax = httpx.post(
        stack.proxy_url() + "/embed", json={"inputs": PROMPT}, headers=stack.auth(), timeout=60
    )
    assert lorax.status_code == 200 and lorax.json()["embeddings"] == base[0]

    monkeypatch.setenv("PREDIBASE_GATEWAY", stack.server.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", stack.token)
    pb = Predibase()
    # The SDK's LoRAX embed (async client only, base model only) through serving_url_override.
    sdk_lorax = pb.deployments.async_client(DEPLOYMENT, serving_url=stack.server.url)
    assert asyncio.run(sdk_lorax.embed(PROMPT)).embeddings == base[0]
    # `pb.embeddings.create` always builds https://<serving host>/...; its request (model = adapter id,
    # extra_body api_token) is sent here over plain http to the same path, by the SDK's own code.
    pb.embeddings._client, pb.embeddings.model = openai, DEPLOYMENT
    sdk_openai = pb.embeddings.create(model=DEPLOYMENT, input=PROMPT, adapter_id="acme/1")
    assert sdk_openai.data[0].embedding == adapted[0]

    # Another tenant names this tenant's adapter on a deployment of its own: not found.
    stack.other_client.deployments.create("theirs-embed", config={"baseModel": TINY})
    with pytest.raises(NotFoundError):
        stack.other_client.deployments.client("theirs-embed").embed(PROMPT, adapter_id="acme/1")


def test_another_tenants_path_deployment_and_adapter_are_not_found(stack: ServingStack) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    other = stack.auth(stack.other_token)
    # The other tenant's token on this tenant's path, and this tenant's token on the other's path.
    assert_error(httpx.post(stack.proxy_url(), json=body, headers=other, timeout=60), 404, "not found")
    mine_on_theirs = httpx.post(
        stack.proxy_url(tenant=stack.other_tenant), json=body, headers=stack.auth(), timeout=60
    )
    assert_error(mine_on_theirs, 404, "not found")
    with pytest.raises(NotFoundError):  # the deployment belongs to the first tenant
        stack.other_client.deployments.client(DEPLOYMENT).generate(PROMPT, max_new_tokens=2)

    stack.other_client.deployments.create("theirs", config={"baseModel": TINY})
    theirs = stack.other_client.deployments.client("theirs")
    assert theirs.generate(PROMPT, max_new_tokens=2).generated_text  # same process, own tenant
    with pytest.raises(NotFoundError):
        theirs.generate(PROMPT, adapter_id="acme/1", max_new_tokens=2)
    # An assertion the caller sends (even a genuine one, for the first tenant and this very request) is
    # replaced by one for the caller's own tenant.
    body["parameters"]["adapter_id"] = "acme/1"
    content = json.dumps(body).encode()
    genuine = stack.serving.signed_headers(stack.tenant, "POST", "http://serving/", content)
    spoofed = {**other, **genuine, "Content-Type": "application/json"}
    url = stack.proxy_url("theirs", tenant=stack.other_tenant)
    assert httpx.post(url, content=content, headers=spoofed, timeout=60).status_code == 404


def _adapter_loads(serving_url: str) -> float:
    text = httpx.get(serving_url + "/metrics", timeout=10).text
    samples = [
        line.split()[-1] for line in text.splitlines() if line.startswith("tuneforge_serving_adapter_loads")
    ]
    return sum(float(value) for value in samples if not value.startswith("#"))


def test_preloaded_adapters_are_loaded_before_any_request_names_them(
    stack: ServingStack, shared_model_cache: Path, tmp_path: Path
) -> None:
    from worker.training.base_models import resolve_base_model

    adapter = _make_adapter(resolve_base_model(TINY, shared_model_cache), tmp_path / "pre")
    version = stack.client.adapters.upload(adapter, repo="preloaded")
    serving_url = stack.serving.ensure_started(TINY).url
    before = _adapter_loads(serving_url)
    stack.client.deployments.create(
        "preloading", config={"baseModel": TINY, "preloadedAdapters": [version.id]}
    )
    deadline = time.monotonic() + 60
    while _adapter_loads(serving_url) <= before:
        assert time.monotonic() < deadline, "the preloaded adapter was never loaded"
        time.sleep(0.2)


def test_a_base_model_that_cannot_start_fails_its_deployment_and_answers_503(stack: ServingStack) -> None:
    missing = stack.server.app.state.ctx.settings.extra_base_models[0]
    created = stack.client.deployments.create("broken", config={"baseModel": missing}, wait=False)
    assert created.status in ("initializing", "failed")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    response = httpx.post(stack.proxy_url("broken"), json=body, headers=stack.auth(), timeout=180)
    assert_error(response, 503, "failed")
    # The shared process's log tail and paths stay in the operator's log.
    for leak in ("last lines of", "Traceback", str(stack.server.app.state.ctx.settings.data_dir)):
        assert leak not in response.text
    events = stack.client.deployments.events("broken")
    assert [e.event_type for e in events][-1] == "Failed" and "exited with code" in events[-1].message
    stack.client.deployments.delete("broken")


def test_a_killed_serving_process_is_restarted_by_the_next_request(stack: ServingStack) -> None:
    serving = stack.client.deployments.client(DEPLOYMENT)
    before = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=6).generated_text
    pid = stack.serving.pid(TINY)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.serving.status(TINY) != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.client.deployments.get(DEPLOYMENT).status == "failed"
    after = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=6).generated_text
    assert after == before
    assert stack.serving.pid(TINY) not in (None, pid)
    kinds = [e.event_type for e in stack.client.deployments.events(DEPLOYMENT)]
    assert kinds[-3:] == ["Failed", "Initializing", "Ready"], kinds


def test_a_wedged_serving_process_is_killed_and_the_next_request_starts_a_new_one(
    stack: ServingStack,
) -> None:
    serving = stack.client.deployments.client(DEPLOYMENT)
    before = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=6).generated_text
    pid = stack.serving.pid(TINY)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive, listening, answering nothing: what a stuck step looks like
    try:
        deadline = time.monotonic() + 30
        while process_alive(pid):
            assert time.monotonic() < deadline, "the wedged serving process was never stopped"
            time.sleep(0.1)
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    events = stack.client.deployments.events(DEPLOYMENT)
    assert events[-1].event_type == "Failed" and "did not answer /health" in events[-1].message
    after = serving.generate(PROMPT, adapter_id="acme/1", max_new_tokens=6).generated_text
    assert after == before
    assert stack.serving.pid(TINY) not in (None, pid)


# --- production: an operator runs the serving process, TUNEFORGE_SERVING_URLS points at it ----------


def _start_operator_serve(settings: Any, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    from app.supervision.serving_processes import settings_environment

    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)],
            env=settings_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_status(client: Tuneforge, name: str, wanted: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.deployments.get(name).status != wanted:
        assert time.monotonic() < deadline, f"{name} never became {wanted}"
        time.sleep(0.1)


def test_serving_urls_point_at_an_operators_server_which_is_health_checked_not_spawned(
    stack_settings_factory: Callable[..., Any], shared_model_cache: Path, tmp_path: Path
) -> None:
    from worker.training.base_models import resolve_base_model

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = stack_settings_factory(
        "embedded", model_cache_dir=shared_model_cache, serving_urls={TINY: f"http://127.0.0.1:{port}"}
    )
    serve = _start_operator_serve(settings, port, tmp_path / "serve.log")
    try:
        with LiveServer(settings) as server:
            token = server.mint_token("operated")
            client = Tuneforge(api_token=token, base_url=server.url)
            adapter = _make_adapter(resolve_base_model(TINY, shared_model_cache), tmp_path / "a")
            client.adapters.upload(adapter, "op")
            client.deployments.create("served", config={"baseModel": TINY}, timeout=180)
            answer = client.deployments.client("served").generate(PROMPT, adapter_id="op/1", max_new_tokens=4)
            assert answer.details is not None and answer.details.generated_tokens == 4
            assert server.app.state.serving.pid(TINY) is None, "nothing is spawned for a configured URL"

            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
            _wait_for_status(client, "served", "failed")
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
            url = f"{server.url}/operated/deployments/v2/llms/served"
            headers = {"Authorization": f"Bearer {token}"}
            down = httpx.post(url, json=body, headers=headers, timeout=60)
            assert_error(down, 503, "does not answer")
            assert f"127.0.0.1:{port}" not in down.text, (
                "the serving process's address is not the caller's business"
            )

            serve = _start_operator_serve(settings, port, tmp_path / "serve.log")  # the operator restarts it
            _wait_for_status(client, "served", "ready")
            assert client.deployments.client("served").generate(PROMPT, max_new_tokens=2).generated_text
            kinds = [e.event_type for e in client.deployments.events("served")]
            assert kinds[-2:] == ["Failed", "Ready"], kinds
            client.close()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
