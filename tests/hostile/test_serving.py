"""A hostile tenant against the shared serving process: one test per case of issue 15 in serving's scope.

Each case is something a tenant can send or upload; each must fail only the tenant who sent it, and
leave every other tenant's answers exactly what they would have been without it.
"""

from __future__ import annotations

import json
import queue
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.db.session import transaction
from app.main import create_app
from app.services import auth
from worker.serving.adapters import AdapterCache, LocalDirectorySource
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig, LLMEngine
from worker.serving.errors import AdapterLoadError, ServingError
from worker.serving.outputs import TokenOutput
from worker.serving.params import SamplingParams
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant
from worker.training.base_models import resolve_base_model

TINY = "tiny-random-llama"
PROMPT = [1, 504, 3458, 282, 4649, 314, 57, 1107]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# tiny-random-llama: hidden 64, 4 query heads and 2 KV heads of 16, MLP 128, 2 layers.
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 32)}


def _write_adapter(
    directory: Path,
    *,
    seed: int,
    poison: str | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A PEFT LoRA on q_proj and v_proj of both layers with random (non-zero) A and B, so it changes
    what is generated. `poison`: "nan" puts one NaN in a lora_A; "wide" gives a lora_A one input too many."""
    generator = torch.Generator().manual_seed(seed)
    rank = 4
    tensors = {}
    for layer in range(2):
        for module, (inp, out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            width = inp + 1 if poison == "wide" and layer == 0 and module == "q_proj" else inp
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=generator) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.3
    if poison == "nan":
        tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][2, 7] = float("nan")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": TINY,
        "r": rank,
        "lora_alpha": 8,
        "target_modules": list(SHAPES),
    }
    if alpha_pattern is not None:
        config["alpha_pattern"] = alpha_pattern
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_base_model(TINY, tmp_path_factory.mktemp("hostile-serving-models"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`good/1`, `good/2` (two tenants' honest adapters) and the hostile ones, as `<root>/<repo>/<N>`."""
    root = tmp_path_factory.mktemp("hostile-adapters")
    _write_adapter(root / "good" / "1", seed=1)
    _write_adapter(root / "good" / "2", seed=2)
    _write_adapter(root / "nan" / "1", seed=3, poison="nan")
    _write_adapter(root / "wide" / "1", seed=4, poison="wide")
    _write_adapter(root / "regex" / "1", seed=5, alpha_pattern={"(.+)+!": 16})
    return root


# --- driving the synchronous engine: the same batches every run -------------------------------------


def _run(engine: LLMEngine, requests: list[tuple[str | None, str]]) -> dict[str, list[int] | ServingError]:
    """Adds every (adapter, tenant) request at once, waits until each adapter loaded or failed, then steps
    until all are done: per `tenant:adapter`, its tokens or the error it ended with."""
    added = {}
    for adapter, tenant in requests:
        request = engine.add_request(PROMPT, GREEDY, adapter, tenant)
        request.deliver = queue.SimpleQueue()
        added[f"{tenant}:{adapter}"] = request
    deadline = time.monotonic() + 60
    refs = [r.adapter_ref for r in added.values() if r.adapter_ref is not None]
    for ref in refs:
        loaded = engine.adapters.wait(ref, timeout=max(0.0, deadline - time.monotonic()))
        assert loaded, "the adapters did not load"
    while engine.has_unfinished:
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        engine.step()
    result: dict[str, list[int] | ServingError] = {}
    for name, request in added.items():
        assert request.deliver is not None
        items: list[TokenOutput | BaseException] = []
        while not request.deliver.empty():
            items.append(request.deliver.get())
        errors = [item for item in items if isinstance(item, ServingError)]
        result[name] = errors[0] if errors else [o.token_id for o in items if isinstance(o, TokenOutput)]
    return result


def _engine(model: Path, adapters: Path) -> LLMEngine:
    config = EngineConfig(model_path=model, model_name=TINY, kv_cache_bytes=16 << 20)
    return LLMEngine(config, LocalDirectorySource(adapters))


HONEST = [("good/1", "alice"), (None, "bob"), ("good/2", "carol"), ("good/1", "dave")]


@pytest.mark.parametrize(("hostile", "what"), [("nan/1", "NaN or infinite"), ("wide/1", "input has 64")])
def test_a_broken_adapter_in_a_mixed_batch_leaves_other_tenants_outputs_unchanged(
    tiny_model: Path, adapters: Path, hostile: str, what: str
) -> None:
    """A single NaN in one lora_A, or a lora_A one input too wide: refused for its own request (a 4xx
    naming it), while everyone else's greedy tokens are those of a run without it, token for token."""
    alone = _run(_engine(tiny_model, adapters), HONEST)
    mixed = _run(_engine(tiny_model, adapters), [*HONEST[:2], (hostile, "mallory"), *HONEST[2:]])

    for adapter, tenant in HONEST:
        assert mixed[f"{tenant}:{adapter}"] == alone[f"{tenant}:{adapter}"], tenant
        assert isinstance(alone[f"{tenant}:{adapter}"], list) and len(alone[f"{tenant}:{adapter}"]) == 12
    refused = mixed[f"mallory:{hostile}"]
    assert isinstance(refused, AdapterLoadError) and 400 <= refused.status_code < 500
    assert hostile in refused.message and what in refused.message
    assert str(adapters) not in refused.message  # no path of the server in what the tenant reads


def test_a_stored_catastrophic_regex_alpha_pattern_is_refused_in_under_a_second(
    tiny_model: Path, adapters: Path
) -> None:
    """`(.+)+!` compiled as a regex against `model.layers.0.self_attn.q_proj` backtracks for hours; the
    loader matches pattern keys as literal suffixes, so a stored one cannot hold a loader thread."""
    engine = _engine(tiny_model, adapters)
    cache: AdapterCache = engine.adapters
    started = time.monotonic()
    adapter = cache.resolve("regex/1", "mallory")
    cache.request(adapter)
    cache.wait(adapter, timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"loading took {elapsed:.1f} s"
    refused = cache.state(adapter)
    assert isinstance(refused, AdapterLoadError) and "alpha_pattern" in refused.message
    assert (
        _run(engine, [("good/1", "alice")])["alice:good/1"]
        == _run(_engine(tiny_model, adapters), [("good/1", "alice")])["alice:good/1"]
    )


# --- over HTTP: the serving process itself ----------------------------------------------------------


class _Server:
    """The serving app over a started engine, called in-process (the engine thread is real)."""

    def __init__(self, engine: AsyncEngine, tenant: str) -> None:
        self.engine = engine
        self.client = TestClient(build_app(engine, tenants=TrustedTenant(tenant)))

    def __enter__(self) -> TestClient:
        self.engine.start()
        return self.client.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(*exc)
        self.engine.shutdown()


def test_a_seed_past_64_bits_is_refused_and_the_engine_answers_the_next_request(
    tiny_model: Path, adapters: Path
) -> None:
    """The issue's request verbatim: it killed the engine thread, and every later request hung."""
    config = EngineConfig(model_path=tiny_model, model_name=TINY, kv_cache_bytes=16 << 20)
    engine = AsyncEngine(config, LocalDirectorySource(adapters))
    with _Server(engine, "alice") as client:
        huge = {"prompt": "hello", "max_tokens": 4, "seed": 18446744073709551616}
        refused = client.post("/v1/completions", json=huge)
        assert refused.status_code in (400, 422) and refused.json()["error"]["param"] == "seed"
        lorax = client.post("/generate", json={"inputs": "hello", "parameters": {"seed": 2**64}})
        assert lorax.status_code in (400, 422) and "seed" in lorax.json()["error"]

        answered = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "seed": 7})
        assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 4
        assert client.get("/health").status_code == 200


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


# What a tenant can send in the fields of the serving API beyond plain text, and the field each 4xx names.
HOSTILE_FIELDS = [
    (_schema(_nested(200)), "response_format"),  # past the depth bound
    (_schema({"enum": ["x" * 1000] * 80}), "response_format"),  # past the size bound
    (_schema({"$ref": "#"}), "response_format"),  # recursive without end
    (_schema({"type": "integer", "minimum": 5, "maximum": 1}), "response_format"),  # unsatisfiable
    ({"guided_regex": "(?!)"}, "guided_regex"),  # matches nothing
    ({"guided_regex": "(" * 2000 + ")" * 2000}, "guided_regex"),
    ({"n": 128, "max_tokens": 200}, "n"),  # would take the batch and the cache
    ({"logit_bias": {str(10**9 + i): 100 for i in range(300)}}, "logit_bias"),
    ({"logprobs": 10**6}, "logprobs"),
    ({"best_of": 3, "n": 4}, "best_of"),
    ({"presence_penalty": 1e308}, "presence_penalty"),
]


def test_hostile_constraints_and_sampling_fields_fail_alone_and_the_engine_keeps_its_answers(
    tiny_model: Path, adapters: Path
) -> None:
    """Each request is refused (4xx naming its field) before it can cost the shared engine anything, and
    another tenant's greedy answer is the same before and after all of them."""
    config = EngineConfig(model_path=tiny_model, model_name=TINY, kv_cache_bytes=16 << 20)
    engine = AsyncEngine(config, LocalDirectorySource(adapters))
    honest = {"model": "good/1", "prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with _Server(engine, "alice") as client:
        before = client.post("/v1/completions", json=honest).json()["choices"][0]["text"]
        for extra, field in HOSTILE_FIELDS:
            started = time.monotonic()
            refused = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8} | extra)
            assert refused.status_code in (400, 413, 422), (field, refused.text)
            assert field in refused.text, (field, refused.text)
            assert time.monotonic() - started < 10, f"{field}: a refusal must not wait on the engine"
        embeddings = client.post("/v1/embeddings", json={"input": ["x"] * 5000})
        assert embeddings.status_code in (400, 413, 422) and "input" in embeddings.text
        assert client.post("/v1/completions", json=honest).json()["choices"][0]["text"] == before
        assert client.get("/health").status_code == 200


# --- deleted and recreated versions, through the storage source over PostgreSQL and S3 --------------


@pytest.fixture(scope="module")
def control_plane(stack_settings_factory: Any) -> Iterator[TestClient]:
    with TestClient(create_app(stack_settings_factory("postgres_s3"))) as client:
        yield client


def _tenant(control_plane: TestClient) -> tuple[str, TestClient]:
    name = f"t-{secrets.token_hex(4)}"
    with transaction(control_plane.app.state.ctx.sessions) as session:  # type: ignore[attr-defined]
        token = auth.create_token(session, auth.get_or_create_user(session, name, "alice"))
    return name, TestClient(control_plane.app, headers={"Authorization": f"Bearer {token}"})


def _upload(client: TestClient, repo: str, directory: Path) -> None:
    begun = client.post("/v2/adapters/upload", json={"repo": repo})
    assert begun.status_code == 200, begun.text
    for path in directory.iterdir():
        url = begun.json()["presignedUrls"][path.name]
        put = client.put if url.startswith(str(client.base_url)) else httpx.put
        put(url, content=path.read_bytes()).raise_for_status()
    done = client.put("/v2/adapters/upload/", json={"uploadToken": begun.json()["uploadToken"]})
    assert done.status_code == 200, done.text


def _storage_server(control_plane: TestClient, tenant: str, tiny_model: Path, cache: Path) -> _Server:
    from worker.serve_main import StorageAdapterSource

    ctx = control_plane.app.state.ctx  # type: ignore[attr-defined]
    source = StorageAdapterSource(ctx, cache, tenant, base_model=TINY)
    config = EngineConfig(model_path=tiny_model, model_name=TINY, kv_cache_bytes=16 << 20)
    return _Server(AsyncEngine(config, source), tenant)


def _generate(client: TestClient, adapter: str) -> httpx.Response:
    parameters = {"adapter_id": adapter, "max_new_tokens": 8, "ignore_eos_token": True}
    return client.post("/generate", json={"inputs": "The quick brown fox", "parameters": parameters})


def _until_status(client: TestClient, adapter: str, status: int, within_s: float) -> httpx.Response:
    deadline = time.monotonic() + within_s
    while True:
        response = _generate(client, adapter)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_a_deleted_version_stops_being_served_and_a_recreated_repo_never_serves_the_old_weights(
    control_plane: TestClient, tiny_model: Path, tmp_path: Path
) -> None:
    tenant, api = _tenant(control_plane)
    first, second = _write_adapter(tmp_path / "w1", seed=11), _write_adapter(tmp_path / "w2", seed=12)
    _upload(api, "victim", first)
    with _storage_server(control_plane, tenant, tiny_model, tmp_path / "cache") as serving:
        old = _generate(serving, "victim/1")
        assert old.status_code == 200, old.text

        assert api.delete("/v2/repos/victim/version/1").status_code in (200, 204)
        gone = _until_status(serving, "victim/1", 404, within_s=5)
        assert gone.status_code == 404 and "victim/1" in gone.json()["error"]

        assert api.delete("/v2/repos/victim").status_code in (200, 204)
        _upload(api, "victim", second)  # a new repo of the same name: its first version is victim/1 again
        new = _until_status(serving, "victim/1", 200, within_s=5)
        assert new.status_code == 200, new.text
    with _storage_server(control_plane, tenant, tiny_model, tmp_path / "fresh-cache") as fresh:
        expected = _generate(fresh, "victim/1")
    assert expected.status_code == 200
    assert new.json()["generated_text"] == expected.json()["generated_text"]
    assert new.json()["generated_text"] != old.json()["generated_text"]  # the two adapters do differ
