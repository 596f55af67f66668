"""Deployments over the API on both stacks: Predibase shapes, validation, tenancy, events, proxy gate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from predibase.resources.deployment import Deployment as SdkDeployment
from tests_support import assert_error, process_alive

from app.main import create_app

# tests/integration/api/conftest.py's TenantSession (conftest modules are not importable by name).
TenantSession = Any

TINY = "tiny-random-llama"
READY_TIMEOUT_S = 180.0


def _create(tenant: TenantSession, name: str, **config: Any) -> Any:
    body = {"name": name, "config": {"baseModel": TINY, **config}, "description": "for tests"}
    return tenant.client.post("/v2/deployments", json=body)


def _wait_for_events(client: TestClient, name: str) -> dict[str, Any]:
    """Polls like the SDK's `deployments.create(block=True)` until a Ready or Failed event."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        body = client.get(f"/llms/{name}/events", params={"detailed": "true"}).json()
        kinds = [event["eventType"] for event in body["ComputeEvents"]]
        if "Ready" in kinds or "Failed" in kinds or time.monotonic() > deadline:
            return dict(body)
        time.sleep(0.2)


def test_the_default_deployment_exists_without_being_created(tenant: TenantSession) -> None:
    listed = tenant.client.get("/v2/deployments")
    assert listed.status_code == 200, listed.text
    default = listed.json()["data"][0]
    assert default["name"] == "smollm2-135m" and default["type"] == "shared"
    assert default["model"] == {"name": "smollm2-135m", "maxInputLength": 8192}
    assert default["config"]["baseModel"] == "smollm2-135m"
    got = tenant.client.get("/v2/deployments/smollm2-135m").json()["data"]
    assert got["uuid"] == default["uuid"]
    assert SdkDeployment.model_validate(got).model == "smollm2-135m"


def test_create_get_list_update_delete_in_predibase_shapes(tenant: TenantSession) -> None:
    created = _create(tenant, "my-llm", minReplicas=0, maxReplicas=1, preloadedAdapters=[])
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["name"] == "my-llm" and body["description"] == "for tests" and body["type"] == "dedicated"
    assert body["status"] in ("initializing", "ready", "failed")
    assert body["model"] == {"name": TINY, "maxInputLength": 2048}
    assert body["config"] == {
        "baseModel": TINY,
        "minReplicas": 0,
        "maxReplicas": 1,
        "preloadedAdapters": [],
        "engine": "tuneforge",
    }

    got = tenant.client.get("/v2/deployments/my-llm").json()["data"]
    sdk_view = SdkDeployment.model_validate(got)  # the SDK's own model accepts it
    assert (sdk_view.name, sdk_view.model, sdk_view.context_window) == ("my-llm", TINY, 2048)
    assert sdk_view.config.base_model == TINY and sdk_view.uuid == body["uuid"]
    assert [d["name"] for d in tenant.client.get("/v2/deployments").json()["data"]] == [
        "smollm2-135m",
        "my-llm",
    ]

    updated = tenant.client.put(
        "/v2/deployments/my-llm", json={"description": "changed", "config": {"maxReplicas": 2}}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["data"]["description"] == "changed"
    assert updated.json()["data"]["config"]["maxReplicas"] == 2
    assert updated.json()["data"]["config"]["baseModel"] == TINY

    assert tenant.client.delete("/v2/deployments/my-llm").status_code == 200
    assert_error(tenant.client.get("/v2/deployments/my-llm"), 404, "not found")
    assert [d["name"] for d in tenant.client.get("/v2/deployments").json()["data"]] == ["smollm2-135m"]


def test_sdk_configs_with_every_unset_field_null_create_and_update(tenant: TenantSession) -> None:
    from predibase.config import DeploymentConfig, UpdateDeploymentConfig

    config = DeploymentConfig(base_model=TINY).model_dump(mode="json", by_alias=True)
    response = tenant.client.post("/v2/deployments", json={"name": "sdk-shaped", "config": config})
    assert response.status_code == 200, response.text
    assert response.json()["config"] == {"baseModel": TINY, "engine": "tuneforge"}
    change = UpdateDeploymentConfig(max_replicas=3).model_dump(mode="json", by_alias=True)
    updated = tenant.client.put("/v2/deployments/sdk-shaped", json={"config": change})
    assert updated.status_code == 200, updated.text
    assert updated.json()["data"]["config"] == {"baseModel": TINY, "maxReplicas": 3, "engine": "tuneforge"}


@pytest.mark.parametrize("name", ["has space", "a/b", "", "-leading", "x" * 65, "a..b"])
def test_a_bad_name_is_refused_with_a_422_naming_the_field(tenant: TenantSession, name: str) -> None:
    assert_error(_create(tenant, name), 422, "name")


def test_an_unknown_base_model_is_refused_naming_base_model_and_the_available_ones(
    tenant: TenantSession,
) -> None:
    body = assert_error(_create(tenant, "nope", baseModel="no-such-model"), 422, "config.baseModel")
    assert "no-such-model" in body["error"] and "tiny-random-llama" in body["error"]
    assert "smollm2-135m" in body["error"]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"baseModel": None}, "config.baseModel: required"),
        ({"minReplicas": 3, "maxReplicas": 1}, "config.minReplicas"),
        ({"maxReplicas": -1}, "config.maxReplicas"),
        ({"preloadedAdapters": ["not an id"]}, "config.preloadedAdapters"),
        ({"preloadedAdapters": "repo/1"}, "config.preloadedAdapters"),
    ],
)
def test_bad_config_fields_are_named(tenant: TenantSession, config: dict[str, Any], fragment: str) -> None:
    assert_error(_create(tenant, "bad-config", **config), 422, fragment)


def test_names_are_unique_per_tenant_and_the_default_cannot_be_taken_changed_or_deleted(
    tenant: TenantSession, other_tenant: TenantSession
) -> None:
    assert _create(tenant, "twice").status_code == 200
    assert_error(_create(tenant, "twice"), 409, "already exists")
    assert _create(other_tenant, "twice").status_code == 200  # another tenant's namespace
    assert_error(_create(tenant, "smollm2-135m"), 409, "already exists")
    assert_error(tenant.client.delete("/v2/deployments/smollm2-135m"), 409, "default deployment")
    put = tenant.client.put("/v2/deployments/smollm2-135m", json={"description": "x"})
    assert_error(put, 409, "default deployment")


def test_another_tenants_deployment_is_not_found(tenant: TenantSession, other_tenant: TenantSession) -> None:
    assert _create(tenant, "private").status_code == 200
    for response in (
        other_tenant.client.get("/v2/deployments/private"),
        other_tenant.client.put("/v2/deployments/private", json={"description": "mine now"}),
        other_tenant.client.delete("/v2/deployments/private"),
        other_tenant.client.get("/llms/private/events"),
    ):
        assert_error(response, 404, "not found")
    assert "private" not in [d["name"] for d in other_tenant.client.get("/v2/deployments").json()["data"]]
    assert tenant.client.get("/v2/deployments/private").status_code == 200


def test_deployment_routes_need_a_token(api_app: TestClient) -> None:
    assert_error(api_app.get("/v2/deployments"), 401, "missing API token")
    assert_error(api_app.post("/tenant/deployments/v2/llms/smollm2-135m", json={}), 401, "missing API token")


def test_events_reach_ready_once_the_serving_process_answers(tenant: TenantSession) -> None:
    assert _create(tenant, "eventful").status_code == 200
    events = _wait_for_events(tenant.client, "eventful")
    kinds = [event["eventType"] for event in events["ComputeEvents"]]
    assert "Ready" in kinds, events
    assert events["deploymentStatus"] == "ready" and events["name"] == "eventful"
    got = tenant.client.get("/v2/deployments/eventful").json()["data"]
    assert got["status"] == "ready" and got["currentReplicas"] == 1
    # A deployment made while the base model is already served is ready from the start.
    assert _create(tenant, "second").json()["status"] == "ready"
    assert [e["eventType"] for e in tenant.client.get("/llms/second/events").json()["ComputeEvents"]] == [
        "Ready"
    ]


def test_the_serving_proxy_refuses_other_tenants_paths_unknown_deployments_and_routes(
    tenant: TenantSession, other_tenant: TenantSession
) -> None:
    assert _create(tenant, "gated").status_code == 200
    prompt = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    # The path's tenant segment must be the caller's: another's answers like a missing deployment.
    theirs = other_tenant.client.post(f"/{tenant.tenant}/deployments/v2/llms/gated", json=prompt)
    assert_error(theirs, 404, "not found")
    wrong_path = tenant.client.post(f"/{other_tenant.tenant}/deployments/v2/llms/gated", json=prompt)
    assert_error(wrong_path, 404, "not found")
    assert_error(tenant.client.post(f"/{tenant.tenant}/deployments/v2/llms/nope", json=prompt), 404, "nope")
    unknown_route = tenant.client.post(f"/{tenant.tenant}/deployments/v2/llms/gated/admin", json=prompt)
    assert_error(unknown_route, 404, "no serving route")


def test_deleting_the_last_deployment_of_a_base_model_stops_its_process(
    stack_settings_factory: Callable[..., Any], new_tenant: Callable[[], TenantSession]
) -> None:
    # An app of its own: other tests' deployments of the same base model would keep it in use.
    app = create_app(stack_settings_factory("embedded", dev_tenant="stop-test"))
    with TestClient(app) as client:
        from app.db.session import transaction
        from app.services import auth

        with transaction(app.state.ctx.sessions) as session:
            token = auth.create_token(session, auth.get_or_create_user(session, "stopper", "alice"))
        client.headers["Authorization"] = f"Bearer {token}"
        for name in ("one", "two"):
            response = client.post("/v2/deployments", json={"name": name, "config": {"baseModel": TINY}})
            assert response.status_code == 200, response.text
        pid = app.state.serving.pid(TINY)
        assert pid is not None and process_alive(pid)
        assert client.delete("/v2/deployments/one").status_code == 200
        assert app.state.serving.pid(TINY) == pid and process_alive(pid), "another deployment still uses it"
        assert client.delete("/v2/deployments/two").status_code == 200
        assert app.state.serving.pid(TINY) is None and not process_alive(pid)
        assert client.get("/v2/deployments").json()["data"][0]["status"] == "standby"
