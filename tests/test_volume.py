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

from app.db.models import Client
from app.db.session import SessionFactory
from app.domain.auth import Principal
from app.domain.endpoints import list_endpoints
from app.domain.messages import MessageFilter, list_messages
from app.domain.optouts import RECIPIENT_LOCKS_SQL, current_opt_outs
from app.domain.pagination import decode_cursor, encode_cursor
from tests.api.test_opt_outs import import_csv
from tests.conftest import World, owned_database_url

pytestmark = pytest.mark.volume

AREAS = (415, 650, 212, 310, 617, 312, 202, 206, 303, 512)
UNRELATED = "+14085550000"  # in none of the imports below


def import_lines(count: int) -> str:
    """`count` distinct valid numbers, one a line."""
    return "\n".join(f"+1{AREAS[n // 10_000]}555{n % 10_000:04d}" for n in range(count))


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

POPULAR = "+14155551000"  # every tenth message of each client goes to this number
LIST_BUDGET_SECONDS = 0.050


async def seed_months(session_factory: SessionFactory, world: World) -> None:
    other = await client_id_of(session_factory, "other-shop")
    async with session_factory.begin() as session:
        await session.execute(
            text(
                """
                INSERT INTO messages (id, client_id, sender_id, kind, "to", "from", body, encoding,
                    segments, status, provider, created_at, updated_at, next_attempt_at)
                SELECT gen_random_uuid(),
                    CASE WHEN n % 2 = 0 THEN CAST(:shop AS uuid) ELSE CAST(:other AS uuid) END,
                    CAST(:sender AS uuid), 'regular',
                    CASE WHEN n % 20 < 2 THEN :popular
                        ELSE '+1415555' || lpad((2000 + n % 7000)::text, 4, '0') END,
                    '+14155550100', 'Your code is ' || n, 'GSM-7', 1, 'delivered', 'twilio',
                    now() - make_interval(secs => n * 10), now(), now()
                FROM generate_series(1, 200000) AS n
                """
            ),
            {
                "shop": world.client_id,
                "other": other,
                "sender": world.twilio_sender.id,
                "popular": POPULAR,
            },
        )
        # 100,000 history rows: 90,000 numbers opted out of one sender or service-wide, 10,000
        # of them opting back in later, service-wide.
        await session.execute(
            text(
                """
                INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
                SELECT '+1' || (CAST(:areas AS text[]))[n / 10000 + 1] || '555'
                        || lpad((n % 10000)::text, 4, '0'),
                    CASE WHEN n % 3 = 0 THEN NULL ELSE CAST(:sender AS uuid) END, 'opt_out',
                    'import', 'client:operator', now() - make_interval(secs => 200000 - n)
                FROM generate_series(0, 89999) AS n
                """
            ),
            {"sender": world.twilio_sender.id, "areas": [str(area) for area in AREAS]},
        )
        await session.execute(
            text(
                """
                INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
                SELECT phone, NULL, 'opt_in', 'api', 'client:operator', now()
                FROM (SELECT DISTINCT phone FROM opt_outs ORDER BY phone LIMIT 10000) AS lifted
                """
            )
        )
        await session.execute(
            text(
                """
                INSERT INTO webhook_endpoints (id, client_id, url, created_at, updated_at)
                SELECT gen_random_uuid(), CAST(:shop AS uuid), 'https://hooks.example/' || n,
                    now() - make_interval(secs => n), now()
                FROM generate_series(1, 5000) AS n
                """
            ),
            {"shop": world.client_id},
        )
    async with session_factory.begin() as session:  # ANALYZE rolled back is forgotten
        for table in ("messages", "opt_outs", "opt_out_states", "webhook_endpoints"):
            await session.execute(text(f"ANALYZE {table}"))


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
    shop = world.client_id
    return {
        "opt-outs": await cursor_at(
            session_factory,
            "SELECT changed_at, history_id FROM opt_out_states WHERE action = 'opt_out' "
            "ORDER BY changed_at DESC, history_id DESC OFFSET 50000 LIMIT 1",
        ),
        "messages": await cursor_at(
            session_factory,
            "SELECT created_at, id FROM messages WHERE client_id = :shop "
            "ORDER BY created_at DESC, id DESC OFFSET 90000 LIMIT 1",
            shop=shop,
        ),
        "messages?to=": await cursor_at(
            session_factory,
            'SELECT created_at, id FROM messages WHERE client_id = :shop AND "to" = :to '
            "ORDER BY created_at DESC, id DESC OFFSET 9000 LIMIT 1",
            shop=shop,
            to=POPULAR,
        ),
        "event-endpoints": await cursor_at(
            session_factory,
            "SELECT created_at, id FROM webhook_endpoints WHERE client_id = :shop "
            "ORDER BY created_at, id OFFSET 4000 LIMIT 1",
            shop=shop,
        ),
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
    await seed_months(session_factory, world)
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
