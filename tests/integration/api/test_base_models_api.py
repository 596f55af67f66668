"""`GET /v2/base-models[/{name}]` and base-model availability at job and deployment submission, on an
embedded stack whose store holds two imported models and whose HF hub cache holds a third."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from model_dirs import lay_out_hf_cache
from tests_support import assert_error

from app.db import Dataset, DatasetStatus
from app.db.session import transaction
from app.main import create_app
from app.services import auth, model_store

CACHED = "acme/tiny-llama"
MAIN_COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40


@dataclass
class Cluster:
    client: TestClient  # authenticated as a tenant with a connected dataset `rows` and a repo `r`
    imported: str  # a Llama in the model store
    unserved: str  # a GPT-2 in the model store
    llama_numel: int
    gpt2_numel: int


@pytest.fixture(scope="module")
def cluster(
    stack_settings_factory: Callable[..., Any],
    tiny_llama_dir: tuple[Path, int],
    tiny_gpt2_dir: tuple[Path, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    hub_cache = tmp_path_factory.mktemp("hf-hub")
    lay_out_hf_cache(hub_cache, CACHED, tiny_llama_dir[0], MAIN_COMMIT)
    lay_out_hf_cache(hub_cache, CACHED, tiny_llama_dir[0], OTHER_COMMIT, ref="v1")
    settings = stack_settings_factory("embedded", hf_hub_cache=hub_cache)
    imported, unserved = f"llama-{secrets.token_hex(3)}", f"gpt-{secrets.token_hex(3)}"
    with TestClient(create_app(settings)) as app:
        ctx = app.app.state.ctx  # type: ignore[attr-defined]
        with ctx.sessions() as session:
            model_store.import_directory(ctx.store, session, settings, tiny_llama_dir[0], imported)
            model_store.import_directory(ctx.store, session, settings, tiny_gpt2_dir[0], unserved)
        with transaction(ctx.sessions) as session:
            user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
            token = auth.create_token(session, user)
            session.add(_connected_dataset(user.tenant_id, user.tenant.uuid))
        client = TestClient(app.app, headers={"Authorization": f"Bearer {token}"})
        assert client.post("/v2/repos", json={"name": "r"}).status_code == 200
        yield Cluster(client, imported, unserved, tiny_llama_dir[1], tiny_gpt2_dir[1])


def _connected_dataset(tenant_id: int, tenant_uuid: str) -> Dataset:
    # As validation leaves it: these tests are about the base model, not the dataset's journey.
    return Dataset(
        tenant_id=tenant_id,
        name="rows",
        file_name="rows.jsonl",
        blob_key=f"tenants/{tenant_uuid}/datasets/{secrets.token_hex(4)}/data.jsonl",
        status=DatasetStatus.CONNECTED,
        format="prompt_completion",
        row_count=20,
        size_bytes=600,
    )


def test_the_listing_has_the_builtins_the_store_and_the_hf_cache_with_their_facts(cluster: Cluster) -> None:
    body = cluster.client.get("/v2/base-models").json()
    models = {m["name"]: m for m in body["data"]}
    assert [m["name"] for m in body["data"][:2]] == ["smollm2-135m", "tiny-random-llama"]
    assert body["count"] == len(body["data"]) == len(models)
    assert models["tiny-random-llama"] | {"description": ""} == {
        "name": "tiny-random-llama", "description": "", "builtin": True, "source": "builtin",
        "architecture": "llama", "parameterCount": 3219776, "contextLength": 2048, "servable": True,
        "chatTemplate": True,
    }  # fmt: skip
    facts = ("source", "architecture", "parameterCount", "contextLength", "servable")
    assert [models[cluster.imported][k] for k in facts] == ["store", "llama", cluster.llama_numel, 512, True]
    assert [models[cluster.unserved][k] for k in facts] == ["store", "gpt2", cluster.gpt2_numel, 128, False]
    assert [models[CACHED][k] for k in facts] == ["hf-cache", "llama", cluster.llama_numel, 512, True]
    # A snapshot that is not the default branch's is listed pinned to its commit.
    assert models[f"{CACHED}@{OTHER_COMMIT}"]["source"] == "hf-cache"
    assert f"{CACHED}@{MAIN_COMMIT}" not in models


def test_one_model_by_name_a_hub_id_with_its_slash_included(cluster: Cluster) -> None:
    got = cluster.client.get(f"/v2/base-models/{CACHED}").json()
    assert (got["name"], got["source"], got["contextLength"]) == (CACHED, "hf-cache", 512)
    assert cluster.client.get(f"/v2/base-models/{cluster.imported}").json()["source"] == "store"
    missing = cluster.client.get("/v2/base-models/llama-3-1-8b-instruct")
    assert_error(missing, 404, "`tuneforge models pull meta-llama/Llama-3.1-8B-Instruct`")
    assert_error(
        cluster.client.get("/v2/base-models/Not a name!"), 422, "name: 'Not a name!' is not a base model"
    )


def test_base_model_routes_need_a_token(cluster: Cluster) -> None:
    for path in ("/v2/base-models", f"/v2/base-models/{CACHED}"):
        assert cluster.client.get(path, headers={"Authorization": ""}).status_code == 401


def _job(cluster: Cluster, base_model: str) -> Any:
    body = {"params": {"base_model": base_model, "train_steps": 3}, "dataset": "rows", "repo": "r"}
    return cluster.client.post("/v2/finetuning/jobs", json=body)


@pytest.mark.parametrize(
    ("base_model", "fragment"),
    [
        ("gpt-17", "params.base_model: gpt-17 is not available on this cluster; an operator makes it "
         "available with `tuneforge models import DIR --name gpt-17`"),
        ("llama-3-1-8b-instruct", "`tuneforge models pull meta-llama/Llama-3.1-8B-Instruct`"),
        ("Qwen/Qwen2.5-7B-Instruct", "`tuneforge models pull Qwen/Qwen2.5-7B-Instruct`"),
        (f"{CACHED}@v2", f"`tuneforge models pull {CACHED}@v2`"),
        ("not a name!", "params.base_model: 'not a name!' is not a base model name"),
    ],
)  # fmt: skip
def test_a_job_on_a_model_this_cluster_lacks_is_refused_saying_how_to_get_it(
    cluster: Cluster, base_model: str, fragment: str
) -> None:
    body = assert_error(_job(cluster, base_model), 422, fragment)
    assert "tiny-random-llama" in body["error"], "the error lists what is available"


@pytest.mark.parametrize("which", ["imported", "cached", "cached-by-branch", "cached-by-commit"])
def test_a_job_on_a_stored_or_cached_model_is_accepted(cluster: Cluster, which: str) -> None:
    base_model = {
        "imported": cluster.imported,
        "cached": CACHED,
        "cached-by-branch": f"{CACHED}@v1",
        "cached-by-commit": f"{CACHED}@{OTHER_COMMIT}",
    }[which]
    response = _job(cluster, base_model)
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["baseModel"]) == ("queued", base_model)


def test_a_deployment_of_an_architecture_the_engine_does_not_serve_is_refused_listing_those_it_does(
    cluster: Cluster,
) -> None:
    response = cluster.client.post(
        "/v2/deployments", json={"name": "gpt", "config": {"baseModel": cluster.unserved}}
    )
    body = assert_error(response, 422, f"config.baseModel: {cluster.unserved} is a 'gpt2' model")
    assert "llama, mistral, qwen2" in body["error"]
    missing = cluster.client.post(
        "/v2/deployments", json={"name": "big", "config": {"baseModel": "llama-3-1-8b-instruct"}}
    )
    assert_error(missing, 422, "config.baseModel: llama-3-1-8b-instruct is not available on this cluster")


def test_a_turbo_job_asking_for_an_eagle_draft_the_engine_cannot_serve_on_its_family_is_refused(
    cluster: Cluster,
) -> None:
    body = {"params": {"base_model": cluster.unserved, "adapter": "turbo", "train_steps": 3}}
    refused = cluster.client.post("/v2/finetuning/jobs", json=body | {"dataset": "rows", "repo": "r"})
    assert_error(refused, 422, "params.speculator_architecture: eagle speculators are served on llama")
    body["params"]["speculator_architecture"] = "medusa"
    accepted = cluster.client.post("/v2/finetuning/jobs", json=body | {"dataset": "rows", "repo": "r"})
    assert accepted.status_code == 200, accepted.text
