"""Engine and session factory; built from Settings at an entry point, never at import time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

# A request waits at most this long for a pooled connection before it is answered 503.
POOL_TIMEOUT_SECONDS = 10


def make_engine(database_url: str, *, connect_timeout_seconds: int = 5) -> Engine:
    """pool_pre_ping replaces connections a database restart broke, so service resumes by itself."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if database_url.startswith("sqlite"):
        # Request threads and worker processes share the file; WAL lets readers run beside a writer.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_timeout"] = POOL_TIMEOUT_SECONDS
        kwargs["connect_args"] = {
            # Connecting to an unreachable host fails after this instead of the OS's minutes.
            "connect_timeout": connect_timeout_seconds,
            # A peer that vanished without closing (host down, partition) is noticed on idle sockets.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
    engine = create_engine(database_url, **kwargs)
    if database_url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def close_session(session: Session) -> None:
    """Close `session`, tolerating a connection the database dropped meanwhile (already invalidated).

    A request's session closes after its response may have been sent; an outage starting just then
    must not turn a finished request into an error (nor cost the client its keep-alive connection).
    """
    try:
        session.close()
    except DBAPIError as exc:
        if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
            raise
        log.warning("closing a session on a lost database connection: %s", str(exc).splitlines()[0])
