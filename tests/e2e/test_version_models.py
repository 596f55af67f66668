"""Deployments of an adapter version (`config.baseModel: "repo/N"`) on a live server whose supervisor runs
the real `tuneforge serve`: a DoRA version served merged into its base, a full version served as its own
model, each answering through the proxy exactly as Hugging Face greedy decoding of that model does."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live_server import LiveServer
from peft import PeftModel
from tests_support import assert_error
from transformers import AutoModelForCausalLM
from tuneforge import Tuneforge
from version_artifacts import TINY, StoredVersion, greedy, peft_adapter, publish, whole_model

from worker.training.base_models import resolve_base_model

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
NEW_TOKENS = 8
SERVING_TIMEOUT_S = 240


@dataclass
class Stack:
    server: LiveServer
    tenant: str
    token: str
    other_token: str
    client: Tuneforge
    other_client: Tuneforge
    base_dir: Path
    dora: StoredVersion
    dora_dir: Path
    full: StoredVersion
    full_dir: Path

    def generate(self, deployment: str, parameters: dict[str, Any]) -> httpx.Response:
        url = f"{self.server.url}/{self.tenant}/deployments/v2/llms/{deployment}/generate"
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, **parameters}}
        return httpx.post(url, json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)


@pytest.fixture(scope="module")
def stack(
    stack_settings_factory: Callable[..., Any],
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    settings = stack_settings_factory("embedded", model_cache_dir=shared_model_cache)
    base_dir = resolve_base_model(TINY, shared_model_cache)
    scratch = tmp_path_factory.mktemp("versions")
    with LiveServer(settings) as server:
        tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
        token, other_token = server.mint_token(tenant), server.mint_token(other)
        client = Tuneforge(api_token=token, base_url=server.url)
        other_client = Tuneforge(api_token=other_token, base_url=server.url)
        ctx = server.app.state.ctx
        dora_dir = peft_adapter(base_dir, scratch / "dora", dora=True)
        full_dir = whole_model(base_dir, scratch / "full")
        dora = publish(ctx, tenant, "acme", "dora", dora_dir)
        full = publish(ctx, tenant, "acme", "full", full_dir)
        yield Stack(
            server, tenant, token, other_token, client, other_client, base_dir, dora, dora_dir, full, full_dir
        )
        client.close()
        other_client.close()


def _engine_tokens(stack: Stack, deployment: str) -> tuple[list[int], list[int]]:
    response = stack.generate(deployment, {"details": True, "decoder_input_details": True})
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    return [t["id"] for t in details["prefill"]], [t["id"] for t in details["tokens"]]


def test_a_dora_version_deployed_as_a_model_answers_as_the_adapter_does(stack: Stack) -> None:
    deployment = stack.client.deployments.create(
        "dora-model", config={"baseModel": stack.dora.id}, timeout=SERVING_TIMEOUT_S
    )
    assert deployment.status == "ready"
    prompt, served = _engine_tokens(stack, "dora-model")
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(stack.base_dir, dtype=torch.float32), stack.dora_dir
    )
    base = AutoModelForCausalLM.from_pretrained(stack.base_dir, dtype=torch.float32)
    assert served == greedy(adapter, prompt, NEW_TOKENS)
    assert served != greedy(base, prompt, NEW_TOKENS), (
        "the DoRA must change the output for this to mean anything"
    )
    # Per-request adapters of the base model are refused there, saying why.
    refused = stack.generate("dora-model", {"adapter_id": stack.full.id})
    assert_error(refused, 422, "merged into its base model")
    # A deployed version (or its repo) cannot be deleted from under its deployment.
    headers = {"Authorization": f"Bearer {stack.token}"}
    tag = stack.dora.id.split("/")[1]
    assert_error(
        httpx.delete(f"{stack.server.url}/v2/repos/acme/version/{tag}", headers=headers), 409, "dora-model"
    )
    assert_error(httpx.delete(f"{stack.server.url}/v2/repos/acme", headers=headers), 409, "dora-model")


def test_a_full_version_deployed_as_a_model_answers_as_its_own_model(stack: Stack) -> None:
    stack.client.deployments.create(
        "full-model", config={"baseModel": stack.full.id}, timeout=SERVING_TIMEOUT_S
    )
    prompt, served = _engine_tokens(stack, "full-model")
    whole = AutoModelForCausalLM.from_pretrained(stack.full_dir, dtype=torch.float32)
    assert served == greedy(whole, prompt, NEW_TOKENS)
    listed = {d.name: d for d in stack.client.deployments.list()}
    assert listed["full-model"].base_model == stack.full.id
    stack.client.deployments.delete("full-model")


def test_another_tenants_or_an_unknown_version_cannot_be_deployed(stack: Stack) -> None:
    url = f"{stack.server.url}/v2/deployments"
    for token, model in ((stack.other_token, stack.dora.id), (stack.token, "acme/9")):
        body = {"name": "stolen", "config": {"baseModel": model}}
        headers = {"Authorization": f"Bearer {token}"}
        assert_error(httpx.post(url, json=body, headers=headers), 422, f"{model} not found")
    preload = {"name": "p", "config": {"baseModel": stack.dora.id, "preloadedAdapters": [stack.full.id]}}
    headers = {"Authorization": f"Bearer {stack.token}"}
    assert_error(httpx.post(url, json=preload, headers=headers), 422, "config.preloadedAdapters")
