"""Inputs the database cannot hold, and forged tokens of any alphabet, are 4xx on both stacks."""

from __future__ import annotations

from conftest import TenantSession


def test_a_nul_in_the_path_or_query_is_a_400_before_any_lookup(tenant: TenantSession) -> None:
    for url in ("/v2/repos/a%00b", "/v2/datasets/%00", "/v1/datasets/name/rows?connectionName=%00"):
        response = tenant.client.get(url)
        assert response.status_code == 400, (url, response.text)
        assert "NUL" in response.json()["error"]


def test_a_nul_inside_a_json_body_is_a_4xx_on_both_stacks(tenant: TenantSession) -> None:
    response = tenant.client.post("/v2/repos", json={"name": "nul-desc", "description": "a\u0000b"})
    # SQLite stores it; PostgreSQL cannot, which is a 422 naming the NUL rather than a 500.
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert "NUL" in response.json()["error"]


def test_upload_tokens_with_non_ascii_characters_are_refused_as_forged(tenant: TenantSession) -> None:
    for path, body in (
        ("/v2/datasets/upload", {"name": "x", "uploadToken": "é.é"}),
        ("/v2/adapters/upload", {"uploadToken": "é.é"}),
    ):
        response = tenant.client.put(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert "uploadToken" in response.json()["error"]
