"""Engine and session factory. One transaction per unit of work; `expire_on_commit=False` so
objects stay readable after commit without another round trip."""

from __future__ import annotations

import time
from typing import Any, Final

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.metrics import DB_STATEMENTS, DB_TRANSACTIONS

SessionFactory = async_sessionmaker[AsyncSession]

# A pooled connection that sat unused longer than this is pinged before it is handed out:
# PostgreSQL may have restarted meanwhile. One in steady use is not: a ping costs three round
# trips (BEGIN, an empty query, ROLLBACK), as much as the work of a whole request. A connection
# that broke while in use fails its statement, and the pool then replaces every connection.
IDLE_PING_SECONDS: Final = 1.0


def create_engine(
    database_url: str, *, pool_size: int = 10, max_overflow: int | None = None
) -> AsyncEngine:
    """An asyncpg engine that checks idle connections before use (PostgreSQL may have
    restarted) and counts its statements. Overflow connections (beyond `pool_size`; as many
    again unless told) are closed when returned: a pool sized to the load should have none."""
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
    )
    ping_when_idle(engine)
    count_statements(engine)
    return engine


def ping_when_idle(engine: AsyncEngine) -> None:
    """Ping a connection at checkout when it was idle longer than `IDLE_PING_SECONDS`; a failed
    ping makes the pool try a new connection (SQLAlchemy's `DisconnectionError` protocol)."""

    def checked_in(_: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since <= IDLE_PING_SECONDS:
            return
        try:
            dbapi_connection.ping()
        except Exception as error:
            raise exc.DisconnectionError(f"stale pooled connection: {error!r}") from error

    event.listen(engine.sync_engine, "checkin", checked_in)
    event.listen(engine.sync_engine, "checkout", checked_out)


def count_statements(engine: AsyncEngine) -> None:
    """Count statements and transactions in the process's metrics: what one message costs in
    database work is read from them (README, "Benchmark")."""
    committed = DB_TRANSACTIONS.labels(outcome="commit")
    rolled_back = DB_TRANSACTIONS.labels(outcome="rollback")

    def on_statement(*_: Any) -> None:
        DB_STATEMENTS.inc()

    event.listen(engine.sync_engine, "before_cursor_execute", on_statement)
    event.listen(engine.sync_engine, "commit", lambda _: committed.inc())
    event.listen(engine.sync_engine, "rollback", lambda _: rolled_back.inc())


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
