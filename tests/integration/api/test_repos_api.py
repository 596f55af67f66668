"""Repos over the Predibase v2 wire shape: create/existsOk, list, get, delete, names, tenancy."""

from __future__ import annotations

import pytest
from tests_support import assert_error


def test_create_get_list_delete(tenant) -> None:
    created = tenant.client.post("/v2/repos", json={"name": "support-bot", "description": "first"})
    assert created.status_code == 200, created.text
    repo = created.json()
    assert repo["name"] == "support-bot" and repo["description"] == "first" and repo["versions"] == []

    by_name = tenant.client.get("/v2/repos/support-bot").json()
    by_uuid = tenant.client.get(f"/v2/repos/{repo['uuid']}").json()
    assert by_name == by_uuid

    listed = tenant.client.get("/v2/repos?limit=10").json()
    assert [r["name"] for r in listed["data"]["repos"]] == ["support-bot"]

    assert tenant.client.delete("/v2/repos/support-bot").status_code == 200
    assert_error(tenant.client.get("/v2/repos/support-bot"), 404, "not found")


def test_exists_ok_returns_the_existing_repo_and_conflict_otherwise(tenant) -> None:
    first = tenant.client.post("/v2/repos", json={"name": "dup"}).json()
    again = tenant.client.post("/v2/repos", json={"name": "dup", "existsOk": True})
    assert again.status_code == 200 and again.json()["uuid"] == first["uuid"]
    assert_error(tenant.client.post("/v2/repos", json={"name": "dup"}), 409, "existsOk")


def test_list_respects_limit_and_reports_count(tenant) -> None:
    for i in range(3):
        tenant.client.post("/v2/repos", json={"name": f"r{i}"})
    body = tenant.client.get("/v2/repos?limit=2").json()["data"]
    assert len(body["repos"]) == 2 and body["count"] == 3


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("a/b", "path separators"),
        ("a\\b", "path separators"),
        ("..", "'..'"),
        ("x..y", "'..'"),
        ("has space", "spaces"),
        ("x" * 65, "at most 64"),
        ("", "must not be empty"),
        ("-leading", "start with a letter or digit"),
        ("semi;colon", "may contain only"),
    ],
)
def test_invalid_repo_names_are_422_naming_the_field(tenant, name: str, fragment: str) -> None:
    body = assert_error(tenant.client.post("/v2/repos", json={"name": name}), 422, fragment)
    assert body["error"].startswith("name:")


def test_another_tenants_repo_is_404_and_untouched(tenant, other_tenant) -> None:
    tenant.client.post("/v2/repos", json={"name": "private", "description": "mine"})
    assert_error(other_tenant.client.get("/v2/repos/private"), 404, "not found")
    assert_error(other_tenant.client.delete("/v2/repos/private"), 404, "not found")
    assert other_tenant.client.get("/v2/repos").json()["data"]["repos"] == []
    # Creating the same name in another tenant is independent, not a conflict.
    assert other_tenant.client.post("/v2/repos", json={"name": "private"}).status_code == 200
    assert tenant.client.get("/v2/repos/private").json()["description"] == "mine"


def test_malformed_json_body_is_4xx_with_error(tenant) -> None:
    response = tenant.client.post(
        "/v2/repos", content=b'{"name": "x",', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "not valid JSON")


def test_missing_required_field_names_it(tenant) -> None:
    assert_error(tenant.client.post("/v2/repos", json={"description": "no name"}), 422, "name")


def test_a_page_offset_past_any_table_is_a_422_naming_offset_not_a_database_error(tenant) -> None:  # type: ignore[no-untyped-def]
    # Found by the fuzzer: 2**63 overflowed SQLite's integer and PostgreSQL's bigint (a 500).
    assert_error(tenant.client.get(f"/v2/repos?offset={2**63}"), 422, "offset")
    assert tenant.client.get(f"/v2/repos?offset={2**31 - 1}").json()["data"]["repos"] == []
