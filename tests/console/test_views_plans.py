"""The console's reads use indexes on months of data: no sequential scan of the big tables."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.console.consent_view import consent_view
from app.console.conversations import conversation
from app.console.events_view import (
    FAILING_WINDOW,
    EndpointCursor,
    failed_events,
    failing_endpoints,
    retrying_events,
)
from app.console.messages import read_search, search_messages
from app.console.overview import traffic
from app.db.session import SessionFactory
from tests.conftest import World

PHONE = "+14155550123"
BIG_TABLES = (
    "messages",
    "inbound_messages",
    "webhook_events",
    "webhook_endpoints",
    "opt_outs",
    "opt_out_states",
)

# 120 days of messages in arrival order (60,000, one number in fifty is PHONE), 20,000 inbound
# messages, 2,000 endpoints with 40,000 events (one in a thousand failed), 20,000 opt-outs.
SEED = [
    """INSERT INTO messages (id, client_id, sender_id, "to", "from", body, encoding, segments,
        status, provider, created_at, next_attempt_at)
    SELECT gen_random_uuid(), :client, :sender,
        CASE WHEN n % 50 = 0 THEN :phone ELSE '+1415' || lpad(n::text, 7, '0') END,
        '+14155550100', 'hello', 'GSM-7', 1,
        (ARRAY['delivered','delivered','delivered','failed','sent'])[1 + n % 5], 'twilio',
        now() - interval '120 days' + n * interval '172.8 seconds', now()
    FROM generate_series(1, 60000) AS n""",
    """INSERT INTO inbound_messages (id, provider, provider_message_id, sender_id, "to", "from",
        body, payload, created_at)
    SELECT gen_random_uuid(), 'twilio', 'SM' || n, :sender, '+14155550100',
        CASE WHEN n % 50 = 0 THEN :phone ELSE '+1415' || lpad(n::text, 7, '0') END, 'hi', '{}',
        now() - interval '120 days' + n * interval '518 seconds'
    FROM generate_series(1, 20000) AS n""",
    """INSERT INTO webhook_endpoints (id, client_id, url)
    SELECT gen_random_uuid(), :client, 'https://hooks.example.test/' || n
    FROM generate_series(1, 2000) AS n""",
    """INSERT INTO webhook_events (id, type, client_id, endpoint_id, payload, status, attempts,
        created_at)
    SELECT gen_random_uuid(), 'message.delivered', :client, endpoint.id, '{}',
        CASE WHEN n % 1000 = 0 THEN 'failed' ELSE 'delivered' END, 1,
        now() - interval '120 days' + n * interval '259 seconds'
    FROM generate_series(1, 40000) AS n
    CROSS JOIN LATERAL (SELECT id FROM webhook_endpoints ORDER BY id
        OFFSET n % 2000 LIMIT 1) AS endpoint""",
    """INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
    SELECT '+1628' || lpad(n::text, 7, '0'),
        CASE WHEN n % 3 = 0 THEN NULL ELSE CAST(:sender AS uuid) END,
        'opt_out', 'keyword', 'recipient', now() - interval '120 days' + n * interval '518 seconds'
    FROM generate_series(1, 20000) AS n""",
]


async def test_console_reads_use_indexes(world: World, session_factory: SessionFactory) -> None:
    engine: AsyncEngine = session_factory.kw["bind"]
    params = {"client": world.client_id, "sender": world.twilio_sender.id, "phone": PHONE}
    async with engine.begin() as connection:
        for sql in SEED:
            await connection.execute(text(sql), params)
        # `clients` analyzed too: the search's plan was seen to turn to a sequential scan of
        # `messages` when `clients` had no statistics (it now joins them after its limit).
        for table in (*BIG_TABLES, "clients"):
            await connection.execute(text(f"ANALYZE {table}"))

    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith(("SAVEPOINT", "ROLLBACK TO", "RELEASE")):
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with session_factory() as session:
            talk = await conversation(session, PHONE, world.twilio_sender.id, limit=20)
            await conversation(session, PHONE, world.twilio_sender.id, before=talk.older)
            window = await traffic(session)
            failing = (await failing_endpoints(session, limit=10)).endpoints
            await failing_endpoints(
                session,
                after=EndpointCursor(datetime.now(UTC) - FAILING_WINDOW, 1, 0, failing[-1].id),
            )
            failed = await failed_events(session, limit=10)
            await failed_events(session, after=failed.next_cursor)
            retrying = await retrying_events(session)
            await retrying_events(session, after=retrying.next_cursor or (datetime.now(UTC), 0))
            await consent_view(session, PHONE)
            for raw in ({"status": "failed"}, {"sender": str(world.twilio_sender.id)}):
                form = await read_search(session, raw, "US")
                found = await search_messages(session, form)
                await search_messages(session, await read_search(session, raw | {
                    "cursor": found.next_cursor or ""}, "US"))  # fmt: skip
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)

    assert len(talk.turns) == 20 and talk.older is not None
    assert 400 <= window.total <= 600  # one day of 120
    assert failing and len(failed.events) == 10
    assert found.next_cursor is not None
    plans = []
    async with engine.connect() as connection:
        for statement, parameters in statements:
            result = await connection.exec_driver_sql("EXPLAIN " + statement, parameters)
            plans.append("\n".join(row[0] for row in result))
    for plan in plans:
        for table in BIG_TABLES:
            assert f"Seq Scan on {table}" not in plan, plan
    assert any("ix_messages_created_brin" in plan for plan in plans)
    assert any("ix_webhook_events_failed" in plan for plan in plans)
    laterals = [
        (plan, sql) for plan, (sql, _) in zip(plans, statements, strict=True) if "LATERAL" in sql
    ]
    searches = [plan for plan, sql in laterals if '"to" = ' not in sql]
    assert len(searches) == 4 and all("ix_messages_client_created" in p for p in searches), plans
    # A conversation reads its page per client through (client_id, to, created_at, id), each
    # scan stopping after the page (PHONE has 1,200 messages): found by the second review, as
    # `client_id IN (every client)` read all of them and sorted them.
    talks = [(sql, params) for sql, params in statements if "LATERAL" in sql and '"to" = ' in sql]
    assert len(talks) == 2
    async with engine.connect() as connection:
        for sql, params in talks:
            result = await connection.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params)
            plan = "\n".join(row[0] for row in result)
            assert "ix_messages_client_to_created" in plan, plan
            read = re.findall(r"Index Scan using \w+ on messages .*rows=(\d+)", plan)
            assert read and all(int(n) <= 51 for n in read), plan
