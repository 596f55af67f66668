"""The signed tenant assertion the control plane attaches to every request it sends a serving process.

A serving process answers every tenant of its base model, so it must know who asks; the tenant
cannot travel in a bare header, which anyone who reaches the port could set. Instead the control
plane (the proxy, the supervisor's warm-ups, the metrics view) signs a short-lived assertion:

    X-Tuneforge-Assertion: v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256)>

The claims name the tenant, the HTTP method, the path on the serving process, the sha256 of the
body and an expiry a few seconds away; so an assertion seen on the wire cannot be replayed for
another route or another prompt, nor for long. The MAC key is derived from the deployment's
`secret_key` with a purpose of its own, so no other token the control plane signs can pass as one.

Both planes use this module (the control plane signs, `worker/serving` verifies), which is why it
lives in the client distribution: standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

ASSERTION_HEADER = "X-Tuneforge-Assertion"
_VERSION = "v1"
_PURPOSE = b"tuneforge.serving-assertion.v1"
# Long enough for a request to cross a cluster network, short enough that a captured assertion is
# soon useless; the serving process checks it once, when the request arrives (a long generation is
# not cut off when it expires).
DEFAULT_TTL_SECONDS = 30
MAX_TTL_SECONDS = 300
# Clocks of the API and serving pods may disagree this much (NTP keeps them far closer).
CLOCK_LEEWAY_SECONDS = 5
# Tenant names are short; a header longer than this is not one of ours and is refused unparsed.
MAX_TENANT_LENGTH = 128
MAX_ASSERTION_LENGTH = 4096


class InvalidAssertionError(Exception):
    """The request carries no assertion, or one that is forged, expired, or made for another request."""


@dataclass(frozen=True)
class Assertion:
    """What a verified assertion says: who asks, and the body it was signed for."""

    tenant: str
    body_sha256: str
    expires_at: int

    def check_body(self, body: bytes) -> None:
        digest = self.body_sha256
        # compare_digest refuses non-ASCII str (TypeError): such a claim cannot match, it is not an error.
        if not digest.isascii() or not hmac.compare_digest(digest, hashlib.sha256(body).hexdigest()):
            raise InvalidAssertionError("the assertion was signed for another request body")


class TenantAssertions:
    """Signs (control plane) and verifies (serving process) assertions under one deployment secret."""

    def __init__(self, secret_key: str) -> None:
        if not secret_key:
            raise ValueError("secret_key: an empty secret cannot sign serving requests")
        self._key = hmac.new(secret_key.encode(), _PURPOSE, hashlib.sha256).digest()

    def sign(
        self,
        *,
        tenant: str,
        method: str,
        path: str,
        body: bytes = b"",
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        now: float | None = None,
    ) -> str:
        if not 0 < len(tenant) <= MAX_TENANT_LENGTH:
            raise ValueError(f"tenant: {len(tenant)} characters; a tenant name has 1..{MAX_TENANT_LENGTH}")
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds: {ttl_seconds}; assertions live 1..{MAX_TTL_SECONDS} s")
        claims = {
            "t": tenant,
            "m": method.upper(),
            "p": path,
            "b": hashlib.sha256(body).hexdigest(),
            "exp": int(now if now is not None else time.time()) + ttl_seconds,
        }
        payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{_VERSION}.{payload}"
        return f"{signed}.{self._mac(signed)}"

    def headers(self, *, tenant: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """The header to send with one request (`body`: the exact bytes that will be sent)."""
        return {ASSERTION_HEADER: self.sign(tenant=tenant, method=method, path=path, body=body)}

    def verify(self, assertion: str | None, *, method: str, path: str, now: float | None = None) -> Assertion:
        """The claims of a genuine, current assertion made for this method and path.

        The body is checked separately (`Assertion.check_body`), once it has been read: a request
        whose assertion is refused here is answered before its body is read at all.
        """
        if not assertion:
            raise InvalidAssertionError(f"the request carries no {ASSERTION_HEADER} header")
        if len(assertion) > MAX_ASSERTION_LENGTH:
            raise InvalidAssertionError("the assertion is too long to be genuine")
        version, _, rest = assertion.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise InvalidAssertionError("the assertion is not in the v1.<claims>.<signature> format")
        if not mac.isascii() or not hmac.compare_digest(mac, self._mac(f"{version}.{payload}")):
            raise InvalidAssertionError("the assertion's signature does not match")
        claims, signed_method, signed_path = _claims(payload)
        moment = now if now is not None else time.time()
        if claims.expires_at + CLOCK_LEEWAY_SECONDS < moment:
            raise InvalidAssertionError("the assertion has expired")
        if claims.expires_at - moment > MAX_TTL_SECONDS + CLOCK_LEEWAY_SECONDS:
            raise InvalidAssertionError("the assertion claims to live longer than any assertion may")
        if signed_method != method.upper() or signed_path != path:
            raise InvalidAssertionError("the assertion was signed for another method or path")
        return claims

    def _mac(self, signed: str) -> str:
        return _b64encode(hmac.new(self._key, signed.encode(), hashlib.sha256).digest())


def _claims(payload: str) -> tuple[Assertion, str, str]:
    """(claims, method, path) of a payload whose MAC matched; still checked field by field."""
    try:
        claims = json.loads(_b64decode(payload))
    except ValueError:
        raise InvalidAssertionError("the assertion's claims are not valid JSON") from None
    if not isinstance(claims, dict):
        raise InvalidAssertionError("the assertion's claims are not an object")
    shape = {"t": str, "m": str, "p": str, "b": str, "exp": int}
    if any(not isinstance(claims.get(key), kind) for key, kind in shape.items()):
        raise InvalidAssertionError("the assertion's claims are incomplete")
    if isinstance(claims["exp"], bool) or not 0 < len(claims["t"]) <= MAX_TENANT_LENGTH:
        raise InvalidAssertionError("the assertion's claims are out of range")
    assertion = Assertion(tenant=claims["t"], body_sha256=claims["b"], expires_at=claims["exp"])
    return assertion, claims["m"], claims["p"]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
