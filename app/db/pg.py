"""The send path's own connection pool: plain asyncpg, without SQLAlchemy's layers.

One SQLAlchemy execute costs this service 256-388 µs of CPU; the same statement on the same asyncpg
connection 20-60 µs. The hot path (authenticating, accepting messages) therefore speaks asyncpg
directly, on a pool of fixed size; the schema stays SQLAlchemy's and Alembic's (app.db.models).
Statements and transactions are counted in the same metrics as the engine's (app.db.session), so
the SQL a message costs is read the same way whichever pool ran it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
from sqlalchemy.engine import make_url

from app.kernel.metrics import DB_STATEMENTS, DB_TRANSACTIONS

APPLICATION_NAME: Final = "smsgate-api-send"
# This pool's statements are few, prepared once per connection, and keyed by primary or unique
# keys and arrays: the same plan fits every parameter value. Left to choose ("auto"), PostgreSQL
# kept planning the accept statement anew for each send, which cost about a third of its CPU
# per send (0.55-0.70 ms against 0.35-0.38 ms with the generic plan, measured on one connection).
PLAN_CACHE_MODE: Final = "force_generic_plan"


def asyncpg_dsn(database_url: str) -> str:
    """The settings' SQLAlchemy URL (`postgresql+asyncpg://…`) as a libpq DSN for asyncpg."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Nothing to undo when a connection goes back to the pool.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release: a round trip per request, and PostgreSQL CPU. The send path
    leaves no session state to undo: its locks are transaction-level
    (`pg_try_advisory_xact_lock`), it declares no cursors, listens to nothing and sets nothing
    (the settings above are the connection's own). An open transaction is still rolled back:
    asyncpg does that before calling this.
    """


class Database:
    """A fixed-size asyncpg pool, opened on first use.

    Opened lazily so that the API starts (and answers 503) while PostgreSQL is down, as the
    SQLAlchemy engine does; a failed opening is tried again by the next request.
    """

    def __init__(self, database_url: str, *, size: int) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _open(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                # min = max and no idle expiry: connections are opened once, never churned. A
                # connection PostgreSQL dropped fails its statement once (503) and is reopened.
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._size,
                    max_size=self._size,
                    max_inactive_connection_lifetime=0,
                    reset=_keep_session,
                    # Named, so an operator (or a test) can tell the send path's connections apart.
                    server_settings={
                        "application_name": APPLICATION_NAME,
                        "plan_cache_mode": PLAN_CACHE_MODE,
                    },
                )
            return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, for statements that each commit on their own."""
        pool = await self._open()
        async with pool.acquire() as connection:
            yield connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction that commits when the block ends."""
        async with self.connection() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                yield connection
            except BaseException:
                await transaction.rollback()
                DB_TRANSACTIONS.labels(outcome="rollback").inc()
                raise
            await transaction.commit()
            DB_TRANSACTIONS.labels(outcome="commit").inc()

    async def close(self) -> None:
        """Close every connection (the app's shutdown)."""
        if self._pool is not None:
            await self._pool.close()


async def fetch(connection: Any, sql: str, *args: Any, autocommit: bool = False) -> list[Any]:
    """`connection.fetch`, counted; `autocommit` for a statement that is its own transaction."""
    DB_STATEMENTS.inc()
    if not autocommit:
        rows: list[Any] = await connection.fetch(sql, *args)
        return rows
    try:
        rows = await connection.fetch(sql, *args)
    except BaseException:
        DB_TRANSACTIONS.labels(outcome="rollback").inc()
        raise
    DB_TRANSACTIONS.labels(outcome="commit").inc()
    return rows
