"""The signed tenant assertion: what it binds (tenant, method, path, body, expiry) and what it refuses."""

from __future__ import annotations

import base64
import json

import pytest
from tuneforge.serving_auth import (
    ASSERTION_HEADER,
    CLOCK_LEEWAY_SECONDS,
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    InvalidAssertionError,
    TenantAssertions,
)

SECRET = "a-deployment-secret-of-enough-length-0123456789"
NOW = 1_900_000_000.0


def _sign(**overrides: object) -> str:
    claims: dict[str, object] = {"tenant": "acme", "method": "POST", "path": "/generate", "body": b"{}"}
    claims |= overrides
    return TenantAssertions(SECRET).sign(now=NOW, **claims)  # type: ignore[arg-type]


def test_a_genuine_assertion_names_its_tenant_and_body() -> None:
    verified = TenantAssertions(SECRET).verify(_sign(), method="post", path="/generate", now=NOW + 1)
    assert verified.tenant == "acme" and verified.expires_at == NOW + DEFAULT_TTL_SECONDS
    verified.check_body(b"{}")
    with pytest.raises(InvalidAssertionError, match="another request body"):
        verified.check_body(b'{"inputs": "other"}')


@pytest.mark.parametrize(
    ("method", "path", "reason"),
    [("GET", "/generate", "another method or path"), ("POST", "/v1/completions", "another method or path")],
)
def test_an_assertion_is_bound_to_its_method_and_path(method: str, path: str, reason: str) -> None:
    with pytest.raises(InvalidAssertionError, match=reason):
        TenantAssertions(SECRET).verify(_sign(), method=method, path=path, now=NOW)


def test_an_expired_assertion_is_refused_after_the_leeway() -> None:
    expiry = NOW + DEFAULT_TTL_SECONDS
    assertions = TenantAssertions(SECRET)
    assertions.verify(_sign(), method="POST", path="/generate", now=expiry + CLOCK_LEEWAY_SECONDS)
    with pytest.raises(InvalidAssertionError, match="expired"):
        assertions.verify(_sign(), method="POST", path="/generate", now=expiry + CLOCK_LEEWAY_SECONDS + 1)


def test_another_secret_or_an_edited_claim_does_not_verify() -> None:
    with pytest.raises(InvalidAssertionError, match="signature"):
        TenantAssertions(SECRET + "x").verify(_sign(), method="POST", path="/generate", now=NOW)
    version, payload, mac = _sign().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["t"] = "someone-else"
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidAssertionError, match="signature"):
        TenantAssertions(SECRET).verify(f"{version}.{edited}.{mac}", method="POST", path="/generate", now=NOW)


@pytest.mark.parametrize(
    "header", [None, "", "v1", "v1..", "v2.abc.def", "v1.abc.def", "x" * 5000, "v1.!!!.???", "v1.e30.AAAA"]
)
def test_missing_or_malformed_assertions_are_refused(header: str | None) -> None:
    with pytest.raises(InvalidAssertionError):
        TenantAssertions(SECRET).verify(header, method="POST", path="/generate", now=NOW)


def test_signing_bounds_the_tenant_and_the_lifetime() -> None:
    assertions = TenantAssertions(SECRET)
    with pytest.raises(ValueError, match="tenant"):
        assertions.sign(tenant="", method="GET", path="/")
    with pytest.raises(ValueError, match="ttl_seconds"):
        assertions.sign(tenant="acme", method="GET", path="/", ttl_seconds=MAX_TTL_SECONDS + 1)
    with pytest.raises(ValueError, match="secret_key"):
        TenantAssertions("")
    headers = assertions.headers(tenant="acme", method="GET", path="/v1/models")
    assert list(headers) == [ASSERTION_HEADER]
