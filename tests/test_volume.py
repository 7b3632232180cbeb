"""Months of traffic (issue 13): a 100,000-line opt-out import beside ordinary work, and list
pages on 200,000 messages and 100,000 opt-outs. Marked `volume` so they can be run alone
(`pytest -m volume`); they run in the normal suite too."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.access.auth import Principal
from app.consent.optouts import RECIPIENT_LOCKS_SQL, current_opt_outs
from app.db.models import Client
from app.db.session import SessionFactory
from app.events.endpoints import list_endpoints
from app.kernel.pagination import decode_cursor, encode_cursor
from app.sending.messages import MessageFilter, list_messages
from bench.volume import DEEP_ROWS, POPULAR, import_lines, seed_months
from tests.api.test_opt_outs import import_csv
from tests.conftest import World, owned_database_url

pytestmark = pytest.mark.volume

UNRELATED = "+14085550000"  # in none of the imports below


class LockProbe(threading.Thread):
    """Takes an unrelated number's recipient lock again and again, in transactions of its own on
    a connection of its own (its own thread and event loop: the API's CPU-bound parsing must not
    delay the probe), and records how long each take waited."""

    def __init__(self, phone: str) -> None:
        super().__init__(daemon=True)
        self.phone = phone
        self.waits: list[float] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._probe())

    async def _probe(self) -> None:
        dsn = owned_database_url().replace("+asyncpg", "")
        connection = await asyncpg.connect(dsn)
        statement = (
            "SELECT locked FROM "
            + RECIPIENT_LOCKS_SQL.format(phones="SELECT $1::text AS phone")
            + " AS held"
        )
        try:
            self.ready.set()
            while not self.stop.is_set():
                started = time.perf_counter()
                async with connection.transaction():
                    await connection.fetchval(statement, self.phone)
                self.waits.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
        finally:
            await connection.close()


async def test_a_large_import_leaves_unrelated_recipients_free(
    api: httpx.AsyncClient, world: World
) -> None:
    probe = LockProbe(UNRELATED)
    probe.start()
    probe.ready.wait(10)
    started = time.perf_counter()
    try:
        response = await import_csv(api, world, import_lines(100_000))
    finally:
        probe.stop.set()
        await asyncio.to_thread(probe.join, 30)
    took = time.perf_counter() - started

    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == 100_000
    assert len(probe.waits) >= 10, (took, probe.waits)  # the probe ran beside the import
    # One chunk's transaction at most (about 1,000 numbers), not the whole import.
    assert max(probe.waits) < 1.0, (took, sorted(probe.waits)[-5:])


# Lists on months of data: 200,000 messages (two clients), 100,000 opt-out rows, 5,000
# callback-URL endpoints, seeded with set-based SQL.

LIST_BUDGET_SECONDS = 0.050


async def seed(session_factory: SessionFactory, world: World) -> None:
    """200,000 messages (two clients), 100,000 opt-out rows, 5,000 callback-URL endpoints."""
    engine: AsyncEngine = session_factory.kw["bind"]
    async with engine.begin() as connection:
        await seed_months(
            connection,
            shop=world.client_id,
            other=await client_id_of(session_factory, "other-shop"),
            sender=world.twilio_sender.id,
        )


async def client_id_of(session_factory: SessionFactory, name: str) -> uuid.UUID:
    async with session_factory() as session:
        found = await session.scalar(select(Client.id).where(Client.name == name))
    assert found is not None
    return found


async def cursor_at(session_factory: SessionFactory, sql: str, **params: Any) -> str:
    """The cursor a client paging this far would hold: past the row `sql` finds."""
    async with session_factory() as session:
        row = (await session.execute(text(sql), params)).one()
    return encode_cursor(row[0], row[1])


async def median_seconds(
    api: httpx.AsyncClient, path: str, params: dict[str, str], headers: dict[str, str]
) -> tuple[float, httpx.Response]:
    """The median time of five requests (after one to warm up): the machine is shared."""
    response = await api.get(path, params=params, headers=headers)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        response = await api.get(path, params=params, headers=headers)
        times.append(time.perf_counter() - started)
    return statistics.median(times), response


async def deep_cursors(session_factory: SessionFactory, world: World) -> dict[str, str]:
    return {
        name: await cursor_at(session_factory, sql, shop=world.client_id)
        for name, sql in DEEP_ROWS.items()
    }


async def list_plans(
    session_factory: SessionFactory, world: World, cursors: dict[str, str]
) -> list[str]:
    """The plans of the statements the lists run (first and deep pages), as EXPLAIN shows."""
    engine: AsyncEngine = session_factory.kw["bind"]
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    principal = Principal(world.client_id, "shop", None, is_admin=False)
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with session_factory() as session:
            for after in (None, decode_cursor(cursors["opt-outs"], int)):
                for sender_id in (None, world.twilio_sender.id):
                    await current_opt_outs(
                        session, phone=None, sender_id=sender_id, after=after, limit=21
                    )
            for to, deep in ((None, "messages"), (POPULAR, "messages?to=")):
                for cursor in (None, cursors[deep]):
                    await list_messages(
                        session, world.client_id, MessageFilter(to=to), limit=20, cursor=cursor
                    )
            for endpoint_after in (None, decode_cursor(cursors["event-endpoints"], uuid.UUID)):
                await list_endpoints(session, principal, after=endpoint_after, limit=21)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    plans = []
    async with engine.connect() as connection:
        for statement, parameters in statements:
            result = await connection.exec_driver_sql("EXPLAIN " + statement, parameters)
            plans.append("\n".join(row[0] for row in result))
    return plans


async def test_list_pages_answer_fast_on_months_of_data(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await seed(session_factory, world)
    cursors = await deep_cursors(session_factory, world)
    admin, client = world.auth(world.admin_key), world.auth()
    lists = {
        "opt-outs": ("/v1/opt-outs", {}, admin),
        "opt-outs?sender_id=": (
            "/v1/opt-outs",
            {"sender_id": str(world.twilio_sender.id)},
            admin,
        ),
        "messages": ("/v1/messages", {}, client),
        "messages?to=": ("/v1/messages", {"to": POPULAR}, client),
        "event-endpoints": ("/v1/event-endpoints", {}, client),
    }
    slow = {}
    for name, (path, params, headers) in lists.items():
        deep = cursors.get(name, cursors["opt-outs"])
        for page, extra in (("first", {}), ("deep", {"cursor": deep})):
            took, response = await median_seconds(api, path, {**params, **extra}, headers)
            assert response.status_code == 200, (name, page, response.text)
            assert len(response.json()["data"]) == 20, (name, page)
            if took >= LIST_BUDGET_SECONDS:
                slow[f"{name} {page} page"] = round(took * 1000, 1)
    assert not slow, f"list pages slower than 50 ms: {slow}"

    plans = await list_plans(session_factory, world, cursors)

    assert len(plans) == 10  # 4 opt-out pages, 4 message pages, 2 endpoint pages
    for plan in plans:
        for table in ("messages", "opt_outs", "opt_out_states", "webhook_endpoints"):
            assert f"Seq Scan on {table}" not in plan, plan
        assert "Index" in plan, plan
