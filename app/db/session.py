"""Engine and session factory. One transaction per unit of work; `expire_on_commit=False` so
objects stay readable after commit without another round trip."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.kernel.metrics import DB_STATEMENTS, DB_TRANSACTIONS

SessionFactory = async_sessionmaker[AsyncSession]

# Session.info key holding ids of messages to enqueue once the transaction has committed.
ENQUEUE_AFTER_COMMIT: Final = "enqueue_after_commit"
# Session.info key holding callables to run once the transaction has committed (forgetting
# cached copies of what it changed: forgotten earlier, a concurrent request could cache the old).
AFTER_COMMIT: Final = "after_commit"

# A pooled connection that sat unused longer than this is pinged before it is handed out:
# PostgreSQL may have restarted meanwhile. One in steady use is not: a ping costs three round
# trips (BEGIN, an empty query, ROLLBACK), as much as the work of a whole request. A connection
# that broke while in use fails its statement, and the pool then replaces every connection.
IDLE_PING_SECONDS: Final = 1.0


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    generic_plans: bool = False,
) -> AsyncEngine:
    """An asyncpg engine that checks idle connections before use (PostgreSQL may have
    restarted), counts its statements and keeps their parameters out of its errors. Overflow
    connections (beyond `pool_size`; as many again unless told) are closed when returned: a
    pool sized to the load should have none.

    `generic_plans`: its sessions keep one plan per prepared statement (`plan_cache_mode`), for
    an engine whose statements all find rows by key (the delivery road's claims and records):
    left to choose, PostgreSQL re-planned them for every job, 40% of its CPU per message. Not
    for queries on a value a partial index names (`status = 'queued'`): a generic plan cannot
    use that index."""
    settings = {"plan_cache_mode": "force_generic_plan"} if generic_plans else {}
    engine = create_async_engine(
        database_url,
        # A failed statement's parameters are customers' numbers and texts: never in an
        # exception's text, so never in a log line.
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        connect_args={"server_settings": settings},
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


async def ping(engine: AsyncEngine) -> None:
    """One trivial statement: raises unless PostgreSQL answers (an outage's probe)."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


class Tx:
    """One transaction on a pooled connection, spoken to in plain asyncpg where the statements
    are hot (`fetch`: 20-60 µs of CPU each instead of SQLAlchemy's 250-400), and through an ORM
    session where they are not (`session()`: its work is a savepoint inside this transaction,
    so both see and commit the same changes)."""

    def __init__(self, connection: AsyncConnection, raw: asyncpg.Connection) -> None:
        self._connection = connection
        self.raw = raw
        self._session: AsyncSession | None = None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run a statement on the transaction's connection (counted with the engine's)."""
        DB_STATEMENTS.inc()
        rows: list[asyncpg.Record] = await self.raw.fetch(sql, *args)
        return rows

    async def session(self) -> AsyncSession:
        """An ORM session inside this transaction, for the cold paths."""
        if self._session is None:
            self._session = AsyncSession(
                bind=self._connection, expire_on_commit=False, autoflush=False
            )
        return self._session

    async def _commit_session(self) -> dict[str, Any]:
        """Release the session's savepoint (before the transaction commits); its `info`."""
        if self._session is None:
            return {}
        info = dict(self._session.info)
        await self._session.commit()
        await self._session.close()
        return info

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()


@asynccontextmanager
async def raw_transaction(
    session_factory: SessionFactory,
) -> AsyncIterator[tuple[Tx, dict[str, Any]]]:
    """A `Tx` on a connection of the session factory's engine (one pool for both roads). Yields
    the Tx and a dict that receives the ORM session's `info` once it has committed (the event
    deliveries it scheduled). A connection that broke, or whose statement was interrupted (a
    cancellation), is closed rather than handed to the next user: the server rolls back."""
    engine: AsyncEngine = session_factory.kw["bind"]
    async with engine.connect() as connection:
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None  # a checked-out connection has its driver's
        tx = Tx(connection, raw)
        info: dict[str, Any] = {}
        transaction = None
        started = False
        try:
            transaction = raw.transaction()  # refused at once for a connection known closed
            await transaction.start()
            started = True
            yield tx, info
            info |= await tx._commit_session()
            await transaction.commit()
        except BaseException as error:
            DB_TRANSACTIONS.labels(outcome="rollback").inc()
            await _abandon(
                connection, tx, transaction, sound=started and _connection_is_sound(raw, error)
            )
            raise
        DB_TRANSACTIONS.labels(outcome="commit").inc()


async def _abandon(connection: AsyncConnection, tx: Tx, transaction: Any, *, sound: bool) -> None:
    """After a failed raw transaction: roll back what is still open and keep the connection
    when it is `sound`; otherwise, or when anything is left open, close it (the server rolls
    back). A connection must never go back to the pool inside a transaction: every later one on
    it would be a savepoint of it, committing nothing."""
    raw = tx.raw
    if sound and raw.is_in_transaction():
        try:
            await tx._close_session()
            await transaction.rollback()
        except BaseException:
            sound = False
    if not sound or raw.is_closed() or raw.is_in_transaction():
        await connection.invalidate()


async def raw_statement(
    session_factory: SessionFactory, sql: str, *args: Any, setup: str | None = None
) -> list[Any]:
    """One statement in plain asyncpg on a connection of the engine's pool, committed on its own
    (no BEGIN and COMMIT round trips: a single statement is atomic by itself).

    `setup`: what makes the connection ready for `sql` (a function of its own, in `pg_temp`),
    run on it, and `sql` once more, when PostgreSQL answers that the function is missing (as it
    does on a new connection)."""
    engine: AsyncEngine = session_factory.kw["bind"]
    async with engine.connect() as connection:
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None  # a checked-out connection has its driver's
        DB_STATEMENTS.inc()
        try:
            try:
                rows: list[Any] = await raw.fetch(sql, *args)
            except (asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError):
                # (the second when the connection has no `pg_temp` schema yet)
                if setup is None:
                    raise
                await raw.execute(setup)  # once per connection: not counted, as its connect
                rows = await raw.fetch(sql, *args)
        except BaseException as error:
            DB_TRANSACTIONS.labels(outcome="rollback").inc()
            if not _connection_is_sound(raw, error) or raw.is_in_transaction():
                await connection.invalidate()
            raise
        DB_TRANSACTIONS.labels(outcome="commit").inc()
        return rows


def _connection_is_sound(raw: asyncpg.Connection, error: BaseException) -> bool:
    """Whether the connection can be rolled back and reused after `error`: PostgreSQL refused
    a statement (class 08, a connection failure, aside), and nothing was interrupted half-way."""
    if raw.is_closed():
        return False
    sqlstate = sqlstate_of(error)
    return sqlstate is not None and not sqlstate.startswith("08")


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, raised by asyncpg directly or through SQLAlchemy."""
    if isinstance(error, asyncpg.PostgresError):
        return str(error.sqlstate)
    if isinstance(error, exc.DBAPIError):
        orig = error.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(
            getattr(orig, "__cause__", None), "sqlstate", None
        )
        return str(sqlstate) if sqlstate else None
    return None
