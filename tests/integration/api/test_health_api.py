"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient
from tests_support import TEST_SECRET_KEY, assert_error

from app.main import create_app


def test_healthz_and_readyz(api_app: TestClient) -> None:
    assert api_app.get("/healthz").json() == {"status": "ok"}
    ready = api_app.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}


def test_readyz_is_503_json_when_storage_is_unreachable(stack_settings_factory, s3_server) -> None:
    settings = stack_settings_factory(
        "embedded",
        storage_url="s3://bucket-that-does-not-exist/x",
        s3_endpoint_url=s3_server.endpoint_url,
        secret_key=TEST_SECRET_KEY,
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    body = assert_error(response, 503, "storage")
    assert body["checks"] == {"database": "ok", "storage": "unreachable"}
    # Why it is unreachable (the bucket, the endpoint, the exception) is for the log, not the public.
    for secret in ("bucket-that-does-not-exist", s3_server.endpoint_url, "Error"):
        assert secret not in response.text


def test_metrics_count_requests_by_route_template(tenant, api_app: TestClient) -> None:
    tenant.client.get("/v2/repos/some-name")
    text = api_app.get("/metrics").text
    assert 'route="/v2/repos/{ref}"' in text
    assert "tuneforge_http_request_duration_seconds_bucket" in text
    assert "some-name" not in text
