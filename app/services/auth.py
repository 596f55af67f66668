"""API tokens: minting (`pb_<lookup>_<secret>`, shown once), hashing, constant-time verification, expiry,
listing and revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import ApiToken, Tenant, User
from app.db.base import utcnow
from app.errors import AuthenticationError, InvalidInputError, NotFoundError
from app.services.names import validate_name

TOKEN_PREFIX = "pb_"  # the Predibase SDK warns about tokens without it
# A token that expires sooner is useless for a job that runs for hours; one that lives longer than a
# year should not expire at all (and be revoked when it must go).
MIN_TOKEN_LIFETIME = timedelta(minutes=5)
MAX_TOKEN_LIFETIME = timedelta(days=366)
LIFETIME_BOUNDS = "5 minutes and 366 days"


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


def create_token(session: Session, user: User, name: str = "", expires_in: timedelta | None = None) -> str:
    """Store only the hash; the caller shows the returned plaintext once. `expires_in` None: never."""
    if len(name) > 64:
        raise InvalidInputError(f"name: {len(name)} characters; a token's label has at most 64")
    expires_at = None
    if expires_in is not None:
        if not MIN_TOKEN_LIFETIME <= expires_in <= MAX_TOKEN_LIFETIME:
            raise InvalidInputError(
                f"expires_in: {expires_in}; a token lives between {LIFETIME_BOUNDS} (leave it out for a "
                "token that does not expire)"
            )
        expires_at = utcnow() + expires_in
    lookup_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{lookup_id}_{secrets.token_urlsafe(32)}"
    row = ApiToken(
        user_id=user.id, lookup_id=lookup_id, token_sha256=_sha256(token), name=name, expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return token


def list_tokens(session: Session, tenant_name: str | None = None) -> list[ApiToken]:
    """Every token (of one tenant, if named), oldest first; revoked and expired ones too."""
    query = select(ApiToken).join(User, ApiToken.user_id == User.id).join(Tenant, User.tenant_id == Tenant.id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return list(session.scalars(query.order_by(ApiToken.id)).unique())


def revoke_token(session: Session, lookup_id_or_token: str) -> ApiToken:
    """Revoke by the lookup id `token list` shows (or the whole token); from the next request on it is
    refused. Revoking a revoked token keeps its first revocation time."""
    text = lookup_id_or_token.strip()
    lookup_id = text[len(TOKEN_PREFIX) :].partition("_")[0] if text.startswith(TOKEN_PREFIX) else text
    row = session.scalar(select(ApiToken).where(ApiToken.lookup_id == lookup_id))
    if row is None:
        raise NotFoundError(
            f"no API token with lookup id {lookup_id[:32]!r}; `tuneforge token list` shows them"
        )
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return row


def token_state(row: ApiToken, now: datetime | None = None) -> str:
    """`active`, `revoked` or `expired`."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and _aware(row.expires_at) <= (now or utcnow()):
        return "expired"
    return "active"


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
    now = utcnow()
    state = token_state(row, now)
    if state != "active":
        raise AuthenticationError(
            f"this API token is {state}; create a new one with `tuneforge token create`"
        )
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
