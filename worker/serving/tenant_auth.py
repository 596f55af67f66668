"""Who a request to the serving process comes from: a verified control-plane assertion, or nobody.

Every route but `/health` and `/metrics` needs an `X-Tuneforge-Assertion` the control plane signed
(`tuneforge.serving_auth`); without a valid one the request is answered 401 before its body is read
or any route runs, and the tenant adapters resolve in is the one the assertion names. `/health` is
the probe of load balancers and the supervisor; `/metrics` is left open for Prometheus scrapers
because it holds process-wide counters only (no tenant, adapter, prompt or path in any label), the
same numbers every tenant of the deployment sees in its deployment view. Who may reach the port at
all is the NetworkPolicy's business (`deploy/kubernetes`), and `tuneforge serve` binds loopback.

A library caller (unit tests, benchmarks) can build an app that trusts one fixed tenant instead,
but only by saying so: `TrustedTenant("dev")`. The `tuneforge serve` command never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tuneforge.serving_auth import ASSERTION_HEADER, InvalidAssertionError, TenantAssertions

from worker.serving.http_common import TENANT_STATE, error_body

UNSIGNED_PATHS = frozenset({"/health", "/metrics"})
# The control plane sends generation requests (a prompt and parameters); a signed body larger than
# this is not one, and buffering it to check its digest would only cost memory.
MAX_SIGNED_BODY_BYTES = 32 * 1024 * 1024
_SIGNED_ONLY = (
    "this serving process answers only requests the tuneforge control plane signed: send them to the "
    "deployment's URL on the API"
)


@dataclass(frozen=True)
class SignedTenants:
    """Production: the tenant comes from a verified assertion signed with the deployment's secret."""

    assertions: TenantAssertions

    @classmethod
    def from_secret(cls, secret_key: str) -> SignedTenants:
        return cls(TenantAssertions(secret_key))


@dataclass(frozen=True)
class TrustedTenant:
    """Tests and benchmarks in one process: every request is `tenant`'s, and nothing is verified."""

    tenant: str | None


TenantAuth = SignedTenants | TrustedTenant


class TenantAuthMiddleware:
    """Pure ASGI, so that streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app: ASGIApp, auth: TenantAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNSIGNED_PATHS:
            await self.app(scope, receive, send)
            return
        if isinstance(self.auth, TrustedTenant):
            scope.setdefault("state", {})[TENANT_STATE] = self.auth.tenant
            await self.app(scope, receive, send)
            return
        try:
            assertion = self.auth.assertions.verify(
                _header(scope, ASSERTION_HEADER), method=scope["method"], path=scope["path"]
            )
            body = await _read_body(receive)
            assertion.check_body(body)
        except InvalidAssertionError as exc:
            await _refuse(scope, send, 401, f"{exc}; {_SIGNED_ONLY}")
            return
        except _BodyTooLargeError:
            await _refuse(scope, send, 413, f"request body over {MAX_SIGNED_BODY_BYTES} bytes")
            return
        scope.setdefault("state", {})[TENANT_STATE] = assertion.tenant
        await self.app(scope, _replay(body, receive), send)


class _BodyTooLargeError(Exception):
    pass


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_SIGNED_BODY_BYTES:
            raise _BodyTooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, as one message; then the client's own messages (a disconnect, eventually)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    code = "unauthorized" if status == 401 else "request_too_large"
    body: dict[str, Any] = error_body(scope["path"], status, message, None, code)
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Tuneforge-Assertion realm="tuneforge-serving"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
