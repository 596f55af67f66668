"""Typed dependencies shared by the routers: context, DB session, authenticated user, public base URL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db import User
from app.db.session import close_session
from app.services import auth, quotas


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    session = ctx.sessions()
    try:
        yield session
    finally:
        close_session(session)


SessionDep = Annotated[Session, Depends(get_session)]


def get_current_user(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> User:
    user = auth.authenticate_header(session, authorization)
    if session.dirty:
        session.commit()  # last_used_at bookkeeping
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_base_url(request: Request, ctx: CtxDep) -> str:
    """Where clients reach us: the configured public URL, else the URL this request came in on."""
    return (ctx.settings.public_url or str(request.base_url)).rstrip("/")


BaseUrlDep = Annotated[str, Depends(get_base_url)]


def require_storage_room(ctx: CtxDep, session: SessionDep, user: CurrentUser) -> None:
    """429 once the caller's tenant stores its quota; for the routes that store more of its bytes."""
    quotas.require_storage_room(session, user.tenant_id, ctx.settings.tenant_max_stored_bytes)


# As `dependencies=[StorageRoom]` on a route decorator.
StorageRoom = Depends(require_storage_room)
