"""app.db.session: idle pooled connections are pinged at checkout (busy ones are not), and every
statement is counted in the process's metrics. Real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import exc, text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import session as db_session
from app.db.session import Tx, create_engine, create_session_factory
from app.delivery.transitions import run_raw_transaction

IDLE = 0.2  # IDLE_PING_SECONDS for these tests


@pytest.fixture
async def small_engine(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    """The app's engine with one pooled connection, pinged after `IDLE` seconds unused."""
    monkeypatch.setattr(db_session, "IDLE_PING_SECONDS", IDLE)
    engine = create_engine(database, pool_size=1)
    yield engine
    await engine.dispose()


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        pid: int = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return pid


async def terminate(admin: AsyncEngine, pid: int) -> None:
    """What a PostgreSQL restart does to a pooled connection: the server side goes away."""
    async with admin.connect() as connection:
        assert (
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        ).scalar_one()
    for _ in range(100):  # terminating is asynchronous: wait until the backend is gone
        async with admin.connect() as connection:
            alive = await connection.execute(
                text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
            if alive.first() is None:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} still alive")


async def test_an_idle_connection_is_pinged_at_checkout_and_replaced_when_dead(
    small_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    stale = await backend_pid(small_engine)
    await terminate(engine, stale)
    await asyncio.sleep(IDLE + 0.05)

    # The ping finds the connection dead; the pool opens a new one; the statement works.
    fresh = await backend_pid(small_engine)

    assert fresh != stale


async def test_a_connection_used_again_at_once_is_not_pinged(
    small_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    stale = await backend_pid(small_engine)
    await terminate(engine, stale)

    # No ping within IDLE_PING_SECONDS of its last use: the statement itself finds the break.
    with pytest.raises(exc.DBAPIError) as raised:
        await backend_pid(small_engine)

    assert raised.value.connection_invalidated
    assert await backend_pid(small_engine) != stale  # and the pool replaced it


async def test_pings_happen_only_after_idling(
    small_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = 0
    real_ping: Callable[[AsyncAdapt_asyncpg_connection], None] = AsyncAdapt_asyncpg_connection.ping

    def counting_ping(self: AsyncAdapt_asyncpg_connection) -> None:
        nonlocal pings
        pings += 1
        real_ping(self)

    monkeypatch.setattr(AsyncAdapt_asyncpg_connection, "ping", counting_ping)
    first = await backend_pid(small_engine)  # a new connection: nothing to check
    for _ in range(3):
        assert await backend_pid(small_engine) == first  # in steady use
    assert pings == 0

    await asyncio.sleep(IDLE + 0.05)
    assert await backend_pid(small_engine) == first  # alive: the same connection, kept

    assert pings == 1


def statements() -> float:
    return REGISTRY.get_sample_value("smsgate_db_statements_total") or 0.0


def transactions(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("smsgate_db_transactions_total", labels) or 0.0


async def test_every_statement_and_transaction_is_counted(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:  # warmed up: no first-connect queries below
        await connection.execute(text("SELECT 1"))
    before = statements()
    commits, rollbacks = transactions("commit"), transactions("rollback")

    async with engine.begin() as connection:
        for n in range(3):
            await connection.execute(text("SELECT CAST(:n AS integer)"), {"n": n})
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 4"))
        await connection.rollback()

    assert statements() - before == 4  # BEGIN, COMMIT and ROLLBACK are not statements
    assert transactions("commit") - commits == 1
    assert transactions("rollback") - rollbacks == 1


# ---- raw_transaction: a connection never goes back to the pool broken or inside a transaction


@pytest.fixture
async def one_connection(database: str) -> AsyncIterator[AsyncEngine]:
    """An engine with a single pooled connection: whatever one transaction leaves on it, the
    next one gets."""
    engine = create_engine(database, pool_size=1, max_overflow=0)
    yield engine
    await engine.dispose()


@pytest.fixture
async def probe(engine: AsyncEngine) -> AsyncIterator[None]:
    """A one-row table whose value other connections read."""
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE raw_probe (id int PRIMARY KEY, v text)"))
        await connection.execute(text("INSERT INTO raw_probe VALUES (1, 'before')"))
    yield
    async with engine.begin() as connection:
        await connection.execute(text("DROP TABLE raw_probe"))


async def test_a_raw_transaction_cancelled_during_its_begin_leaves_no_transaction_open(
    one_connection: AsyncEngine,
    engine: AsyncEngine,
    probe: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled (a job timeout) while BEGIN's answer is on its way: the server began a
    transaction. Were the connection pooled again, every later transaction on it would be a
    savepoint of that one and commit nothing; it is closed instead."""
    factory = create_session_factory(one_connection)

    async def nothing(tx: Tx) -> None:
        await tx.fetch("SELECT 1")

    await run_raw_transaction(factory, nothing)  # the pool's connection, opened
    real_execute = asyncpg.Connection.execute
    slow = True

    async def slow_begin(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal slow
        result = await real_execute(self, query, *args, **kwargs)
        if slow and query.startswith("BEGIN"):
            slow = False
            await asyncio.sleep(5)  # the answer is late
        return result

    monkeypatch.setattr(asyncpg.Connection, "execute", slow_begin)
    task = asyncio.create_task(run_raw_transaction(factory, nothing))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def write(tx: Tx) -> None:
        await tx.fetch("UPDATE raw_probe SET v = 'after' WHERE id = 1")

    await run_raw_transaction(factory, write)
    async with engine.connect() as other:
        seen = (await other.execute(text("SELECT v FROM raw_probe"))).scalar_one()
    assert seen == "after"  # committed, not held in a savepoint of a leaked transaction


async def test_a_raw_transactions_connection_killed_while_pooled_is_replaced(
    one_connection: AsyncEngine, engine: AsyncEngine
) -> None:
    """PostgreSQL restarted while the connection sat in the pool (used again within a second,
    so not pinged): the transaction that finds it dead fails, and the next gets a new one."""
    factory = create_session_factory(one_connection)

    async def own_pid(tx: Tx) -> int:
        pid: int = (await tx.fetch("SELECT pg_backend_pid()"))[0][0]
        return pid

    stale, _ = await run_raw_transaction(factory, own_pid)
    await terminate(engine, stale)
    with pytest.raises(Exception):  # noqa: B017 - whichever way asyncpg finds it dead
        await run_raw_transaction(factory, own_pid)
    fresh, _ = await run_raw_transaction(factory, own_pid)
    assert fresh != stale


async def test_a_statement_makes_its_connection_function_once_per_connection(
    small_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    """`raw_statement`'s `setup` (how the claim's `pg_temp` function is made): run on a
    connection that lacks the function, not again on one that has it, and again on the
    connection that replaced one PostgreSQL dropped."""
    async with engine.begin() as connection:
        await connection.execute(text("DROP SEQUENCE IF EXISTS setup_runs"))
        await connection.execute(text("CREATE SEQUENCE setup_runs"))
    factory = create_session_factory(small_engine)
    sql = "SELECT pg_temp.doubled($1::int) AS value"
    setup = (
        "SELECT nextval('setup_runs');"
        " CREATE FUNCTION pg_temp.doubled(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'"
    )

    async def runs() -> int:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM setup_runs")
            )
        return int(count or 0)

    values = [
        (await db_session.raw_statement(factory, sql, n, setup=setup))[0]["value"]
        for n in (1, 2, 3)
    ]
    made_once = await runs()
    # A second function on the same connection: its `pg_temp` exists now, so PostgreSQL
    # answers "no such function" rather than "no such schema"; made all the same.
    tripled = await db_session.raw_statement(
        factory,
        "SELECT pg_temp.tripled($1::int) AS value",
        5,
        setup="CREATE FUNCTION pg_temp.tripled(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 3'",
    )
    first = await backend_pid(small_engine)
    await terminate(engine, first)
    await asyncio.sleep(IDLE * 2)  # so the checkout's ping finds it dead and replaces it
    after = (await db_session.raw_statement(factory, sql, 4, setup=setup))[0]["value"]

    assert values == [2, 4, 6] and made_once == 1 and tripled[0]["value"] == 15
    assert after == 8 and await runs() == 2
    assert await backend_pid(small_engine) != first
