"""Upload tokens: the signed claim that ties the second half of a two-step upload to its first half."""

from __future__ import annotations

from typing import Any, Literal

from app.context import AppContext
from app.db import User
from app.errors import InvalidInputError
from app.signing import InvalidTokenError

UploadKind = Literal["dataset", "adapter"]


def issue(ctx: AppContext, user: User, kind: UploadKind, **claims: Any) -> str:
    payload = {"kind": kind, "tenant": user.tenant_id, **claims}
    return ctx.upload_signer.dumps(payload, expires_in=ctx.settings.signed_url_ttl_seconds)


def verify(ctx: AppContext, user: User, token: str, kind: UploadKind) -> dict[str, Any]:
    """The token's claims, or a 422 naming `uploadToken` (forged, expired, other tenant or kind)."""
    try:
        claims = ctx.upload_signer.loads(token or "")
    except InvalidTokenError as exc:
        raise InvalidInputError(f"uploadToken: {exc}; start the upload again") from None
    if claims.get("kind") != kind or claims.get("tenant") != user.tenant_id:
        raise InvalidInputError(f"uploadToken: not a {kind} upload token of this tenant")
    return claims
