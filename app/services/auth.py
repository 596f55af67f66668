"""API tokens: minting (`pb_<lookup>_<secret>`, shown once), hashing, and constant-time verification."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import ApiToken, Tenant, User
from app.db.base import utcnow
from app.errors import AuthenticationError
from app.services.names import validate_name

TOKEN_PREFIX = "pb_"  # the Predibase SDK warns about tokens without it


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_or_create_user(session: Session, tenant_name: str, username: str) -> User:
    validate_name(tenant_name, "tenant")
    validate_name(username, "user")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name, short_code=secrets.token_hex(4))
        session.add(tenant)
        session.flush()
    user = session.scalar(select(User).where(User.tenant_id == tenant.id, User.username == username))
    if user is None:
        user = User(tenant=tenant, tenant_id=tenant.id, username=username)
        session.add(user)
        session.flush()
    return user


def create_token(session: Session, user: User, name: str = "") -> str:
    """Store only the hash; the caller shows the returned plaintext once."""
    lookup_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{lookup_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiToken(user_id=user.id, lookup_id=lookup_id, token_sha256=_sha256(token), name=name))
    session.flush()
    return token


def is_valid_token(session: Session, token: str) -> bool:
    try:
        authenticate(session, token)
    except AuthenticationError:
        return False
    return True


def authenticate(session: Session, token: str) -> User:
    if not token.startswith(TOKEN_PREFIX):
        raise AuthenticationError("invalid API token: tuneforge tokens start with 'pb_'")
    lookup_id, sep, _ = token[len(TOKEN_PREFIX) :].partition("_")
    row = session.scalar(select(ApiToken).where(ApiToken.lookup_id == lookup_id)) if sep else None
    # Hash even when the row is missing, so timing does not reveal which lookup ids exist.
    presented = _sha256(token)
    expected = row.token_sha256 if row is not None else _sha256(secrets.token_hex(16))
    if row is None or not hmac.compare_digest(presented, expected):
        raise AuthenticationError("invalid API token; create one with `tuneforge token create`")
    if row.revoked_at is not None:
        raise AuthenticationError(
            "this API token was revoked; create a new one with `tuneforge token create`"
        )
    now = utcnow()
    # Coarse bookkeeping: one write a minute per token, not one per request.
    if row.last_used_at is None or (now - _aware(row.last_used_at)).total_seconds() > 60:
        row.last_used_at = now
    return row.user


def authenticate_header(session: Session, authorization: str | None) -> User:
    """The user behind an `Authorization: Bearer pb_...` header (HTTP requests and WebSocket handshakes)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API token: send the header 'Authorization: Bearer pb_...'")
    return authenticate(session, token.strip())


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone even though they were stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
