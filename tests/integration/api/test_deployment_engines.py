"""A deployment's `config.engine`: checked, stored, and vLLM only where the cluster runs it."""

from __future__ import annotations

from typing import Any

from tests_support import assert_error

# tests/integration/api/conftest.py's TenantSession (conftest modules are not importable by name).
TenantSession = Any

TINY = "tiny-random-llama"


def _create(tenant: TenantSession, name: str, **config: Any) -> Any:
    body = {"name": name, "config": {"baseModel": TINY, **config}}
    return tenant.client.post("/v2/deployments", json=body)


def test_an_unknown_engine_is_refused_naming_the_engines(tenant: TenantSession) -> None:
    assert_error(_create(tenant, "odd-engine", engine="tgi"), 422, "config.engine: one of tuneforge, vllm")
    assert_error(_create(tenant, "not-a-name", engine=["vllm"]), 422, "config.engine")
    names = [d["name"] for d in tenant.client.get("/v2/deployments").json()["data"]]
    assert names == ["smollm2-135m"], "a refused deployment is not stored"


def test_vllm_is_refused_where_the_cluster_does_not_run_it(tenant: TenantSession) -> None:
    # The suite's stacks set neither TUNEFORGE_VLLM_PYTHON nor a vLLM serving URL.
    assert_error(_create(tenant, "on-vllm", engine="vllm"), 422, "does not run vLLM")


def test_an_engine_once_stored_is_kept_when_other_fields_change(tenant: TenantSession) -> None:
    created = _create(tenant, "named-engine", engine="tuneforge")
    assert created.status_code == 200, created.text
    assert created.json()["config"]["engine"] == "tuneforge"
    updated = tenant.client.put("/v2/deployments/named-engine", json={"config": {"maxReplicas": 1}})
    assert updated.status_code == 200, updated.text
    assert updated.json()["data"]["config"]["engine"] == "tuneforge"
    refused = tenant.client.put("/v2/deployments/named-engine", json={"config": {"engine": "vllm"}})
    assert_error(refused, 422, "does not run vLLM")
