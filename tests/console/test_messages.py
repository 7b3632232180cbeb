"""The console's Messages section over plain HTTP: search (a national-format number finds its
E.164 message, through an index), cursor pages, a message's timeline, and the body shown only
on a CSRF-checked request, which is logged."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.console import messages as console_messages
from app.console.messages import PAGE_SIZE, read_search, search_messages, search_statement
from app.console.timeline import message_view
from app.db.models import Message, MessageEvent, WebhookAttempt, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from tests.conftest import World
from tests.console.test_sessions import csrf_of, sign_in
from tests.test_end_to_end import post_message, run_worker

BODY = "Your order #1042 has shipped."


@pytest.fixture
async def console(api: httpx.AsyncClient, world: World) -> httpx.AsyncClient:
    """The API client, signed in to the console with the admin key."""
    assert (await sign_in(api, world.admin_key)).status_code == 303
    return api


async def delivered(api: httpx.AsyncClient, world: World, to: str = "+14155550123") -> str:
    """A message sent through the fake provider and delivered: its id."""
    accepted = await post_message(api, world, to=to, **{"from": "+14155550199"})
    await run_worker()
    return str(accepted["id"])


def result_ids(page: httpx.Response) -> list[str]:
    return re.findall(r'href="/console/messages/([0-9a-f-]{36})"', page.text)


async def test_a_national_format_number_finds_the_message(
    console: httpx.AsyncClient, world: World
) -> None:
    wanted = await delivered(console, world)
    other = await delivered(console, world, to="+14155550124")

    page = await console.get("/console/messages", params={"number": "(415) 555-0123"})

    assert page.status_code == 200
    assert result_ids(page) == [wanted]
    assert BODY not in page.text  # no body in the results
    everything = await console.get("/console/messages")
    assert set(result_ids(everything)) == {wanted, other}
    by_status = await console.get("/console/messages", params={"status": "queued"})
    assert result_ids(by_status) == []


async def test_filters_by_client_sender_and_time(console: httpx.AsyncClient, world: World) -> None:
    wanted = await delivered(console, world)
    for params, expected in (
        ({"client": str(world.client_id)}, [wanted]),
        ({"client": str(uuid.uuid4())}, []),
        ({"sender": str(world.fake_sender.id)}, [wanted]),
        ({"sender": str(world.twilio_sender.id)}, []),
        ({"from": "2000-01-01T00:00", "to": "2000-01-07T00:00"}, []),
        (
            {"from": "2000-01-01T00:00", "to": "2999-01-01T00:00", "number": "+14155550123"},
            [wanted],
        ),
        (
            {"from": (datetime.now(UTC) - timedelta(days=6, hours=23)).strftime("%Y-%m-%dT%H:%M")},
            [wanted],
        ),
        ({"from": "2999-01-01T00:00"}, []),
    ):
        page = await console.get("/console/messages", params=params)
        assert (page.status_code, result_ids(page)) == (200, expected), params


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("number", "call me", "not a phone number"),
        ("status", "lost", "not a message status"),
        ("client", "acme", "not one of the choices"),
        ("from", "yesterday", "not a date and time"),
        ("cursor", "xyz", "not a cursor of this search"),
    ],
)
async def test_bad_search_input_names_the_field(
    console: httpx.AsyncClient, field: str, value: str, reason: str
) -> None:
    page = await console.get("/console/messages", params={field: value})
    assert page.status_code == 422
    assert f"{field}: {reason}" in page.text
    if field != "cursor":  # a field of the form: marked invalid, with its reason beside it
        assert f'id="{field}-error"' in page.text and 'aria-invalid="true"' in page.text


async def test_a_search_without_a_number_covers_the_last_24_hours_by_default(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    recent = await delivered(console, world)
    old = await delivered(console, world, to="+14155550124")
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(old))
            .values(created_at=func.now() - timedelta(hours=25))
        )
    page = await console.get("/console/messages", params={"status": "delivered"})
    assert (page.status_code, result_ids(page)) == (200, [recent])
    # The default is written into the form, so that the operator sees it and can widen it.
    start = re.search(r'id="from" name="from" type="datetime-local" value="([^"]+)"', page.text)
    assert start is not None
    assert abs(datetime.fromisoformat(start.group(1)).replace(tzinfo=UTC)
               - (datetime.now(UTC) - timedelta(hours=24))) < timedelta(minutes=2)  # fmt: skip
    by_number = await console.get("/console/messages", params={"number": "+14155550124"})
    assert result_ids(by_number) == [old]  # a number's search is not bounded in time


async def test_a_range_over_7_days_without_a_number_is_refused_on_from(
    console: httpx.AsyncClient,
) -> None:
    params = {"from": "2026-01-01T00:00", "to": "2026-01-08T00:01", "status": "failed"}
    page = await console.get("/console/messages", params=params)
    assert page.status_code == 422
    assert "from: more than 7 days before the end of the search without a number" in page.text
    assert 'id="from-error"' in page.text
    week = await console.get("/console/messages", params=params | {"to": "2026-01-08T00:00"})
    assert week.status_code == 200
    with_number = await console.get("/console/messages", params=params | {"number": "+14155550123"})
    assert with_number.status_code == 200


SEED = """INSERT INTO messages (id, client_id, sender_id, "to", "from", body, encoding, segments,
    status, provider, created_at, next_attempt_at)
SELECT gen_random_uuid(), :client, :sender, '+1415' || lpad(n::text, 7, '0'), '+14155550100',
    'hello', 'GSM-7', 1, 'delivered', 'twilio',
    now() - interval '120 days' + n * interval '172.8 seconds', now()
FROM generate_series(1, 60000) AS n"""


@pytest.mark.parametrize(
    "filters", [{"status": "rejected"}, {}, {"sender": "SENDER"}], ids=["status", "none", "sender"]
)
async def test_a_search_by_a_rare_status_reads_only_its_time_range(
    world: World, session_factory: SessionFactory, filters: dict[str, str]
) -> None:
    """Status and sender are checked row by row after the index scan (no index of theirs on
    `messages`): without a number, the search reads its time range (24 hours by default, 500
    messages here), never every message of the client (60,000). Found by review."""
    engine: AsyncEngine = session_factory.kw["bind"]
    params = {"client": world.client_id, "sender": world.twilio_sender.id}
    async with engine.begin() as connection:
        await connection.execute(text(SEED), params)
        await connection.execute(text("ANALYZE messages"))
        await connection.execute(text("ANALYZE clients"))
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    async with session_factory() as session:
        wanted = {
            k: (str(world.fake_sender.id) if v == "SENDER" else v) for k, v in filters.items()
        }
        form = await read_search(session, wanted, "US")
        event.listen(engine.sync_engine, "before_cursor_execute", capture)
        try:
            results = await search_messages(session, form)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert len(results.rows) == (PAGE_SIZE if not filters else 0)
    async with engine.connect() as connection:
        # The search's statement (then its savepoint's rollback, which is not explained).
        statement, parameters = next(s for s in reversed(statements) if "LATERAL" in s[0])
        plan = "\n".join(
            row[0]
            for row in await connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters
            )
        )
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    assert removed <= 520, plan  # one day of 120: 500 messages
    assert "Seq Scan on messages" not in plan, plan


async def test_results_come_in_cursor_pages(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    for n in range(PAGE_SIZE + 3):
        await post_message(console, world, to=f"+1415555{n:04d}")
    seen: list[str] = []
    page = await console.get("/console/messages")
    while True:
        seen += result_ids(page)
        older = re.search(r'href="(/console/messages\?[^"]*cursor=[^"]+)"', page.text)
        if older is None:
            break
        page = await console.get(older.group(1).replace("&amp;", "&"))
    async with session_factory() as session:
        newest_first = [
            str(row)
            for row in await session.scalars(
                select(Message.id).order_by(Message.created_at.desc(), Message.id.desc())
            )
        ]
    assert seen == newest_first and len(seen) == PAGE_SIZE + 3


@pytest.mark.parametrize("client", [False, True])
async def test_a_search_by_number_is_served_by_an_index(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory, client: bool
) -> None:
    await delivered(console, world)
    async with session_factory.begin() as session:
        raw = {"number": "(415) 555-0123"} | ({"client": str(world.client_id)} if client else {})
        form = await read_search(session, raw, "US")
        assert len((await search_messages(session, form)).rows) == 1
        statement = search_statement(form)
        connection = await session.connection()
        compiled = statement.compile(dialect=connection.dialect)
        await session.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table otherwise
        result = await connection.exec_driver_sql(
            f"EXPLAIN {compiled.string}",
            tuple(compiled.params[name] for name in compiled.positiontup or ()),
        )
        plan = "\n".join(row[0] for row in result)
    assert "ix_messages_client_to_created" in plan, plan
    assert "Seq Scan on messages" not in plan, plan


async def test_the_timeline_shows_history_parts_and_events_in_time_order(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await delivered(console, world)
    async with session_factory.begin() as session:
        endpoint = WebhookEndpoint(client_id=world.client_id, url="https://hooks.example.test/x")
        session.add(endpoint)
        await session.flush()
        event = WebhookEvent(
            type="message.delivered", client_id=world.client_id, endpoint_id=endpoint.id,
            message_id=uuid.UUID(message_id), status="delivered", attempts=1,
            payload={"type": "message.delivered", "data": {"id": message_id, "body": BODY}},
        )  # fmt: skip
        session.add(event)
        await session.flush()
        session.add(
            WebhookAttempt(
                event_id=event.id, number=1, url=endpoint.url, status="succeeded",
                response_status=204, latency_ms=12,
            )
        )  # fmt: skip

    page = await console.get(f"/console/messages/{message_id}")

    assert page.status_code == 200
    titles = re.findall(r"<strong>([^<]+)</strong>", page.text.split("<h2>Timeline</h2>")[1])
    assert titles == [
        "Status: queued",
        "Status: sending",
        "Status: sent",
        "Status: delivered",
        "Event to the client: message.delivered (delivered)",
        "Delivery attempt 1 of message.delivered: succeeded 204",
    ]
    assert "source</dt><dd>fake" in page.text
    # Hidden everywhere until asked for, payloads included.
    assert BODY not in page.text and "[body hidden]" in page.text


async def test_rows_of_one_transaction_keep_the_order_they_were_written_in(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """Found by review: the timeline's reads had no ORDER BY, and rows written by one
    transaction share its `now()`: their order was the heap's."""
    message_id = uuid.UUID(await delivered(console, world))
    async with session_factory.begin() as session:
        # Written out of id order: the table's (and the index's) order is not the id's.
        for n, detail in ((2, "second"), (1, "first"), (3, "third")):
            session.add(MessageEvent(id=10**12 + n, message_id=message_id, status=None,
                                     applied=False, source="fake", detail=detail))  # fmt: skip
            await session.flush()
    async with session_factory() as session:
        view = await message_view(session, message_id, with_body=False)
    assert view is not None
    details = [dict(e.facts).get("detail") for e in view.entries if e.kind == "history"]
    assert [d for d in details if d in {"first", "second", "third"}] == ["first", "second", "third"]


async def test_show_body_needs_the_csrf_token_and_is_logged(
    console: httpx.AsyncClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    message_id = await delivered(console, world)
    page = await console.get(f"/console/messages/{message_id}")
    caplog.set_level(logging.INFO, logger="app.console")

    for data in ({}, {"csrf_token": "forged"}):
        refused = await console.post(f"/console/messages/{message_id}/body", data=data)
        assert refused.status_code == 403 and BODY not in refused.text
    assert not [r for r in caplog.records if r.getMessage() == "message body shown"]

    shown = await console.post(
        f"/console/messages/{message_id}/body", data={"csrf_token": csrf_of(page)}
    )

    assert shown.status_code == 200 and BODY in shown.text
    [line] = [r for r in caplog.records if r.getMessage() == "message body shown"]
    # The key has no name: its prefix names it.
    assert (line.operator, line.message_id) == (world.admin_key[:10], message_id)  # type: ignore[attr-defined]
    assert BODY not in str(line.__dict__)


async def test_a_redacted_body_cannot_be_shown(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await delivered(console, world)
    async with session_factory.begin() as session:
        await session.execute(
            text("UPDATE messages SET body = '', body_redacted_at = now() WHERE id = :id"),
            {"id": message_id},
        )
    page = await console.get(f"/console/messages/{message_id}")
    assert "deleted by retention" in page.text and "Show body" not in page.text


async def test_an_unknown_message_is_a_404_page(console: httpx.AsyncClient) -> None:
    for path in (f"/console/messages/{uuid.uuid4()}", "/console/messages/not-an-id"):
        page = await console.get(path)
        assert page.status_code == 404 and "No message with id" in page.text


async def test_search_messages_reads_no_body(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await delivered(console, world)
    async with session_factory() as session:
        form = await read_search(session, {}, "US")
        results = await search_messages(session, form)
    assert not hasattr(results.rows[0], "body")


async def test_a_slow_search_is_stopped_with_a_clear_page(
    console: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the second review: a search without a number or a client may read a week of
    every client's traffic, holding a connection as long as it ran. Here it waits on a lock
    (as long as a slow scan would take) and is stopped after the statement timeout."""
    monkeypatch.setattr(console_messages, "SEARCH_TIMEOUT", timedelta(milliseconds=300))
    engine: AsyncEngine = session_factory.kw["bind"]
    async with engine.connect() as holder:
        await holder.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        async with asyncio.timeout(10):  # without the timeout the search waits for the lock
            page = await console.get("/console/messages", params={"status": "failed"})
        took = time.monotonic() - started
        await holder.rollback()

    assert page.status_code == 503 and took < 5
    assert 'id="search-too-slow"' in page.text
    assert "The search took longer than 0.3 s and was stopped" in page.text
    assert 'name="number"' in page.text  # the form is there to narrow the search
    assert (await console.get("/console/messages")).status_code == 200
    async with session_factory() as session:  # the timeout ends with the search
        before = await session.scalar(text("SHOW statement_timeout"))
        await search_messages(session, await read_search(session, {}, "US"))
        assert await session.scalar(text("SHOW statement_timeout")) == before
