"""Tamper-proof, expiring tokens (HMAC-SHA256 over a JSON payload) for upload tokens and blob URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class InvalidTokenError(Exception):
    """The token was forged, altered, issued for another purpose, or has expired."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Each purpose gets its own derived key, so an upload token can never pass as a blob URL."""

    def __init__(self, secret_key: str, purpose: str) -> None:
        self._key = hmac.new(secret_key.encode(), purpose.encode(), hashlib.sha256).digest()

    def dumps(self, payload: dict[str, Any], *, expires_in: int) -> str:
        body = dict(payload, exp=int(time.time()) + expires_in)
        encoded = _b64encode(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{encoded}.{self._mac(encoded)}"

    def loads(self, token: str) -> dict[str, Any]:
        encoded, _, mac = token.partition(".")
        # compare_digest refuses non-ASCII str (TypeError): such a token is forged, not a server error.
        if not mac or not mac.isascii() or not hmac.compare_digest(mac, self._mac(encoded)):
            raise InvalidTokenError("signature does not match")
        try:
            body: dict[str, Any] = json.loads(_b64decode(encoded))
        except ValueError as exc:  # cannot happen for a token we signed, but never trust input
            raise InvalidTokenError("malformed payload") from exc
        if body.pop("exp", 0) < time.time():
            raise InvalidTokenError("expired")
        return body

    def _mac(self, encoded: str) -> str:
        return _b64encode(hmac.new(self._key, encoded.encode(), hashlib.sha256).digest())
