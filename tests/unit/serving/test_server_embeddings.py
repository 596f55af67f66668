"""`/v1/embeddings` (the official `openai` client) and `/embed` (`lorax-client`) against a live server, and
the tenant and bounds checks of both routes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import lorax
import numpy as np
import openai
import pytest
import torch
from embedding_support import hf_embeddings
from fastapi.testclient import TestClient
from server_support import TINY, LiveServingServer
from transformers import AutoTokenizer

from worker.serving.adapters import LocalDirectorySource, ResolvedAdapter
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig
from worker.serving.errors import AdapterNotFoundError
from worker.serving.params import MAX_EMBEDDING_INPUTS
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant
from worker.serving.vllm_engine.engine import VllmEngine
from worker.serving.vllm_engine.process import VllmConfig

TEXTS = ["Once upon a time", "the quick brown fox jumps", "hello"]
CONTEXT = 64


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, adapter_root, max_model_len=CONTEXT) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServingServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _ids(server: LiveServingServer, text: str) -> list[int]:
    return list(server.engine.tokenizer(text)["input_ids"])


def _vectors(response: openai.types.CreateEmbeddingResponse) -> torch.Tensor:
    return torch.tensor([item.embedding for item in response.data])


def test_a_list_of_texts_matches_hf_for_the_base_model_and_peft_for_an_adapter(
    client: openai.OpenAI, server: LiveServingServer, tiny_model_dir: Path, adapter_root: Path
) -> None:
    ids = [_ids(server, text) for text in TEXTS]
    for model, adapter_dir in ((TINY, None), ("acme/2", adapter_root / "acme/2")):
        response = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
        assert response.object == "list" and response.model == model
        assert [item.index for item in response.data] == [0, 1, 2]
        assert all(item.object == "embedding" for item in response.data)
        assert response.usage.prompt_tokens == response.usage.total_tokens == sum(len(i) for i in ids)
        expected = hf_embeddings(tiny_model_dir, adapter_dir, ids)
        torch.testing.assert_close(_vectors(response), expected, atol=1e-4, rtol=0)


def test_every_input_shape_and_base64_give_the_same_vectors(
    client: openai.OpenAI, server: LiveServingServer
) -> None:
    ids = _ids(server, TEXTS[0])
    one = _vectors(client.embeddings.create(model="acme/1", input=TEXTS[0], encoding_format="float"))
    as_ids = _vectors(client.embeddings.create(model="acme/1", input=ids, encoding_format="float"))
    as_id_lists = _vectors(
        client.embeddings.create(model="acme/1", input=[ids, ids], encoding_format="float")
    )
    # The client asks for base64 when no format is given, and decodes it.
    default = _vectors(client.embeddings.create(model="acme/1", input=TEXTS[0]))
    assert torch.equal(one, as_ids) and torch.equal(default, one)
    assert torch.equal(as_id_lists, torch.cat([one, one]))
    raw = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "acme/1", "input": TEXTS[0], "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert torch.equal(torch.from_numpy(decoded.copy())[None], one)


def test_repeated_requests_are_identical_and_adapters_differ(client: openai.OpenAI) -> None:
    def embed(model: str) -> torch.Tensor:
        return _vectors(client.embeddings.create(model=model, input=TEXTS, encoding_format="float"))

    base, again = embed(""), embed(TINY)
    assert torch.equal(base, again)
    for adapter in ("acme/1", "acme/3"):
        assert (embed(adapter) - base).abs().max() > 1e-3


def test_lorax_client_embed_and_an_adapter_through_parameters(server: LiveServingServer) -> None:
    client = lorax.Client(server.url, timeout=60)
    base = client.embed(TEXTS[0]).embeddings
    assert base is not None
    openai_base = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[0]}).json()
    assert base == openai_base["data"][0]["embedding"]
    adapted = httpx.post(
        f"{server.url}/embed", json={"inputs": TEXTS[0], "parameters": {"adapter_id": "acme/1"}}
    )
    assert adapted.status_code == 200 and adapted.json()["embeddings"] != base
    missing = httpx.post(
        f"{server.url}/embed", json={"inputs": "hi", "parameters": {"adapter_id": "acme/99"}}
    )
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 422, "input"),
        ({"input": []}, 422, "input"),
        ({"input": ["a", ""]}, 422, "input"),
        ({"input": [[1, 2], []]}, 422, "input"),
        ({"input": [1, 10**6]}, 422, "input"),
        ({"input": [1] * (CONTEXT + 1)}, 400, "input"),
        ({"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)}, 422, "input"),
        ({"input": "hi", "dimensions": 3}, 422, "dimensions"),
        ({"input": "hi", "dimensions": 0}, 422, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": "hi", "model": "x" * 300}, 422, "model"),
        ({"input": "hi", "model": "acme/99"}, 404, "model"),
    ],
)
def test_bad_openai_requests_are_4xx_naming_the_field(
    server: LiveServingServer, body: dict[str, object], status: int, param: str
) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_dimensions_equal_to_the_hidden_size_is_accepted(client: openai.OpenAI) -> None:
    size = len(client.embeddings.create(model="", input="hi", encoding_format="float").data[0].embedding)
    response = client.embeddings.create(model="", input="hi", dimensions=size, encoding_format="float")
    assert len(response.data[0].embedding) == size
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.embeddings.create(model="", input="hi", dimensions=size - 1)
    assert "hidden size" in str(refused.value)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": ""}, "inputs"),
        ({"inputs": "hi", "parameters": {"adapter_source": "ftp"}}, "adapter_source"),
        ({"inputs": "hi", "parameters": {"adapter_parameters": {"ids": ["a/1"]}}}, "adapter_parameters"),
        ({"inputs": "hi " * 100}, "context"),
    ],
)
def test_bad_lorax_requests_are_4xx_naming_the_field(
    server: LiveServingServer, body: dict[str, object], words: str
) -> None:
    response = httpx.post(f"{server.url}/embed", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert words in response.json()["error"] and response.json()["error_type"] == "validation"


class _TenantSource(LocalDirectorySource):
    """Adapters under `root` belong to tenant `owner`; any other tenant is told they do not exist."""

    def __init__(self, root: Path, owner: str) -> None:
        super().__init__(root)
        self.owner = owner

    def resolve(self, adapter_id: str, tenant: str | None) -> ResolvedAdapter:
        if tenant != self.owner:
            raise AdapterNotFoundError(f"adapter {adapter_id} not found", field="adapter_id")
        return super().resolve(adapter_id, tenant)


def test_another_tenants_adapter_is_a_404_on_both_routes(tiny_model_dir: Path, adapter_root: Path) -> None:
    config = EngineConfig(model_path=tiny_model_dir, model_name=TINY, kv_cache_bytes=16 << 20)
    engine = AsyncEngine(config, _TenantSource(adapter_root, owner="alice"))
    engine.start()
    try:
        alice = TestClient(build_app(engine, tenants=TrustedTenant("alice")))
        bob = TestClient(build_app(engine, tenants=TrustedTenant("bob")))
        assert alice.post("/v1/embeddings", json={"model": "acme/1", "input": "hi"}).status_code == 200
        refused = bob.post("/v1/embeddings", json={"model": "acme/1", "input": "hi"})
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
        lorax_refused = bob.post("/embed", json={"inputs": "hi", "parameters": {"adapter_id": "acme/1"}})
        assert lorax_refused.status_code == 404
        assert (
            bob.post("/v1/embeddings", json={"input": "hi"}).status_code == 200
        )  # the base model is anyone's
    finally:
        engine.shutdown()


def test_the_vllm_engine_refuses_embeddings_with_a_400_that_names_it_and_the_fix(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    """vLLM serves the model through its completions API, which has no hidden states; nothing is started."""
    config = VllmConfig(python=tmp_path / "no-python", model_path=tiny_model_dir, model_name=TINY)
    engine = VllmEngine(config, LocalDirectorySource(adapter_root))
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # what start() reads before vLLM runs
    client = TestClient(build_app(engine, tenants=TrustedTenant("dev")))
    refused = client.post("/v1/embeddings", json={"input": [1, 2, 3]})
    assert refused.status_code == 400
    assert (
        "vllm" in refused.json()["error"]["message"] and "'tuneforge'" in refused.json()["error"]["message"]
    )
    lorax_refused = client.post("/embed", json={"inputs": "hi"})
    assert lorax_refused.status_code == 400 and "vllm" in lorax_refused.json()["error"]
    assert engine.process.pid is None
