"""Bearer-token auth and tenant isolation, on both stacks."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from tests_support import assert_error

from app.db import ApiToken


def test_current_user_reports_tenant_short_code(tenant) -> None:
    body = tenant.client.get("/users/current").json()
    assert body["username"] == "alice"
    assert body["tenant"]["name"] == tenant.tenant
    assert body["tenant"]["shortCode"]
    assert body["tenant"]["subscription"]["active"] is True


def test_missing_token_is_401(api_app: TestClient) -> None:
    response = TestClient(api_app.app).get("/v2/repos")
    assert_error(response, 401, "missing API token")


def test_wrong_token_is_401(api_app: TestClient, tenant) -> None:
    forged = tenant.token[:-4] + ("AAAA" if not tenant.token.endswith("AAAA") else "BBBB")
    for token in (forged, "pb_nonexistent_x", "not-a-pb-token"):
        response = TestClient(api_app.app, headers={"Authorization": f"Bearer {token}"}).get("/v2/repos")
        assert_error(response, 401, "invalid API token")


def test_non_bearer_scheme_is_401(api_app: TestClient, tenant) -> None:
    response = TestClient(api_app.app, headers={"Authorization": f"Basic {tenant.token}"}).get(
        "/users/current"
    )
    assert_error(response, 401, "Bearer")


def test_tokens_are_stored_hashed(api_app: TestClient, tenant) -> None:
    with api_app.app.state.ctx.sessions() as session:
        stored = session.scalars(select(ApiToken.token_sha256)).all()
    assert stored and all(tenant.token not in value for value in stored)
    assert all(len(value) == 64 for value in stored)
