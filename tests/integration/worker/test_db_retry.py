"""Job writes ride out an outage (a TCP proxy cut before the real PostgreSQL), for a bounded time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

from app.db.session import make_engine, make_session_factory
from worker.db_retry import retrying

pytestmark = pytest.mark.integration


@pytest.fixture
def proxied(fresh_postgres_url: str) -> Iterator[tuple[TcpProxy, Session]]:
    url = make_url(fresh_postgres_url)
    with TcpProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        engine = make_engine(through, connect_timeout_seconds=1)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE steps (step integer PRIMARY KEY)"))
        with make_session_factory(engine)() as session:
            yield proxy, session
        engine.dispose()


def _record(session: Session, step: int) -> None:
    session.execute(text("INSERT INTO steps VALUES (:step)"), {"step": step})
    session.commit()


def _steps(session: Session) -> list[int]:
    return list(session.scalars(text("SELECT step FROM steps ORDER BY step")))


def test_a_write_cut_off_by_an_outage_is_rerun_until_it_commits_once_the_database_is_back(
    proxied: tuple[TcpProxy, Session],
) -> None:
    proxy, session = proxied
    _record(session, 1)
    proxy.cut()
    threading.Timer(2.0, proxy.restore).start()

    retrying(session, lambda: _record(session, 2), budget_seconds=60, what="step 2")

    assert _steps(session) == [1, 2]


def test_past_its_budget_the_outage_reaches_the_caller(proxied: tuple[TcpProxy, Session]) -> None:
    proxy, session = proxied
    _record(session, 1)
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(OperationalError):
        retrying(session, lambda: _record(session, 2), budget_seconds=2, what="step 2")
    assert time.monotonic() - started < 10
    proxy.restore()


def test_a_bad_statement_is_not_retried(proxied: tuple[TcpProxy, Session]) -> None:
    _, session = proxied
    _record(session, 1)
    calls = []

    def duplicate() -> None:
        calls.append(1)
        _record(session, 1)

    with pytest.raises(IntegrityError):
        retrying(session, duplicate, budget_seconds=60, what="a duplicate")
    assert len(calls) == 1
