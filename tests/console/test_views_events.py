"""Failing endpoints and events for an operator, and redelivery through app.events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app.console.events_view import (
    failed_events,
    failing_endpoints,
    read_endpoint_cursor,
    redeliver_event,
    retrying_events,
)
from app.db.models import ApiKey, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from app.events.outbox import scheduled
from app.kernel.errors import Conflict, NotFound, ValidationFailed
from tests.conftest import World


async def _operator(sessions: SessionFactory, world: World) -> uuid.UUID:
    """The admin key's id (the operator signs in with it)."""
    async with sessions() as session:
        key_id = await session.scalar(select(ApiKey.id).where(ApiKey.is_admin))
    assert key_id is not None
    return key_id


async def _endpoint(
    sessions: SessionFactory, world: World, url: str, **fields: object
) -> uuid.UUID:
    async with sessions.begin() as session:
        endpoint = WebhookEndpoint(id=uuid.uuid4(), client_id=world.client_id, url=url, **fields)
        session.add(endpoint)
    return endpoint.id


async def _event(
    sessions: SessionFactory,
    world: World,
    endpoint_id: uuid.UUID,
    status: str,
    *,
    attempts: int = 3,
    age: timedelta = timedelta(0),
) -> uuid.UUID:
    async with sessions.begin() as session:
        event = WebhookEvent(
            id=uuid.uuid4(),
            type="message.delivered",
            client_id=world.client_id,
            endpoint_id=endpoint_id,
            payload={"type": "message.delivered"},
            status=status,
            attempts=attempts,
            last_error="HTTP 500" if attempts else None,
            created_at=datetime.now(UTC) - age,
        )
        session.add(event)
    return event.id


async def test_failing_endpoints_and_failed_events(
    world: World, session_factory: SessionFactory
) -> None:
    flaky = await _endpoint(session_factory, world, "https://hooks.example.test/flaky")
    gone = await _endpoint(
        session_factory,
        world,
        "https://hooks.example.test/gone",
        disabled_at=datetime.now(UTC),
        disabled_reason="410 Gone",
    )
    healthy = await _endpoint(session_factory, world, "https://hooks.example.test/ok")
    first = await _event(session_factory, world, flaky, "failed")
    second = await _event(session_factory, world, flaky, "failed")
    await _event(session_factory, world, flaky, "failed", age=timedelta(days=8))  # too old
    await _event(session_factory, world, healthy, "delivered", attempts=1)
    retrying = await _event(session_factory, world, healthy, "pending", attempts=2)
    await _event(session_factory, world, healthy, "pending", attempts=0)  # not tried yet

    async with session_factory() as session:
        endpoints = (await failing_endpoints(session)).endpoints
        page = await failed_events(session, limit=2)
        rest = await failed_events(session, after=page.next_cursor)
        only_gone = await failed_events(session, endpoint_id=gone)
        waiting = (await retrying_events(session)).events

    assert [(e.id, e.failed_events) for e in endpoints] == [(gone, 0), (flaky, 2)]
    assert endpoints[0].disabled_reason == "410 Gone"
    assert endpoints[1].owner == "client shop"
    assert [event.id for event in page.events] == [second, first]
    assert page.next_cursor is not None
    assert len(rest.events) == 1 and rest.next_cursor is None  # the week-old one
    assert only_gone.events == []
    assert [event.id for event in waiting] == [retrying]
    assert waiting[0].next_attempt_at is not None


async def test_failing_endpoints_and_retrying_events_come_in_cursor_pages(
    world: World, session_factory: SessionFactory
) -> None:
    """Found by review: both lists stopped at 50 rows with no way to the rest."""
    endpoints = [
        await _endpoint(session_factory, world, f"https://hooks.example.test/{n}") for n in range(5)
    ]
    for n, endpoint in enumerate(endpoints):  # endpoint n: n + 1 failures, and one retrying
        for _ in range(n + 1):
            await _event(session_factory, world, endpoint, "failed")
        await _event(session_factory, world, endpoint, "pending", attempts=1)
    async with session_factory.begin() as session:  # two retries due at the same time
        await session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.status == "pending")
            .values(next_attempt_at=func.now() + (WebhookEvent.seq % 3) * timedelta(minutes=1))
        )

    seen: list[uuid.UUID] = []
    retried: list[uuid.UUID] = []
    async with session_factory() as session:
        after = None
        while True:
            page = await failing_endpoints(session, limit=2, after=after)
            seen += [e.id for e in page.endpoints]
            if page.next_cursor is None:
                break
            after = read_endpoint_cursor(page.next_cursor)
        retry_after = None
        while True:
            retrying = await retrying_events(session, limit=2, after=retry_after)
            retried += [e.id for e in retrying.events]
            if retrying.next_cursor is None:
                break
            retry_after = retrying.next_cursor
        due = list(
            await session.scalars(
                select(WebhookEvent.id)
                .where(WebhookEvent.status == "pending")
                .order_by(WebhookEvent.next_attempt_at, WebhookEvent.seq)
            )
        )
    assert seen == endpoints[::-1]  # most failures first, each once
    assert retried == due and len(due) == 5
    now_us = round(datetime.now(UTC).timestamp() * 1_000_000)
    old_us = now_us - 15 * 24 * 3600 * 1_000_000  # a window older than two weeks: refused
    for bad in (
        "x",
        "1.1." + str(uuid.uuid4()),
        f"{now_us}.2.1.{uuid.uuid4()}",
        f"{now_us}.1.-1.{uuid.uuid4()}",
        f"{now_us}.1.1.nope",
        f"{old_us}.1.1.{uuid.uuid4()}",
        f"{now_us + 3_600_000_000}.1.1.{uuid.uuid4()}",
        f"{10**30}.1.1.{uuid.uuid4()}",
    ):
        with pytest.raises(ValidationFailed):
            read_endpoint_cursor(bad)


async def test_a_walk_through_failing_endpoints_counts_over_one_window(
    world: World, session_factory: SessionFactory
) -> None:
    """Found by the second review: each page counted over a week ending at its own `now`, so
    failures aging out between pages moved an endpoint from the first page onto the next."""
    aging, steady, quiet = [
        await _endpoint(session_factory, world, f"https://hooks.example.test/{name}")
        for name in ("aging", "steady", "quiet")
    ]
    almost_a_week = timedelta(days=7) - timedelta(minutes=5)
    for _ in range(2):  # two of its three failures leave the window in five minutes
        await _event(session_factory, world, aging, "failed", age=almost_a_week)
    await _event(session_factory, world, aging, "failed")
    for _ in range(2):
        await _event(session_factory, world, steady, "failed")
    await _event(session_factory, world, quiet, "failed")

    async with session_factory() as session:
        first = await failing_endpoints(session, limit=2)
        assert [e.id for e in first.endpoints] == [aging, steady] and first.next_cursor
        later = datetime.now(UTC) + timedelta(minutes=10)  # the next page, followed later
        after = read_endpoint_cursor(first.next_cursor, now=later)
        second = await failing_endpoints(session, limit=2, after=after, now=later)
        fresh = await failing_endpoints(session, limit=2, now=later)  # a new walk: a new window
    assert [e.id for e in second.endpoints] == [quiet]  # not `aging` again
    assert second.next_cursor is None
    assert [e.id for e in fresh.endpoints] == [steady, min(aging, quiet)]


async def test_redeliver_queues_the_event_after_the_commit(
    world: World, session_factory: SessionFactory
) -> None:
    endpoint = await _endpoint(session_factory, world, "https://hooks.example.test/flaky")
    event_id = await _event(session_factory, world, endpoint, "failed")
    async with session_factory.begin() as session:
        view = await redeliver_event(session, await _operator(session_factory, world), event_id)
        jobs = scheduled(session)
    assert view.event.status == "pending"
    assert [job.event_id for job in jobs] == [event_id]
    async with session_factory() as session:
        assert (await failed_events(session)).events == []

    async with session_factory.begin() as session:
        with pytest.raises(Conflict):  # still pending
            await redeliver_event(session, await _operator(session_factory, world), event_id)
        with pytest.raises(NotFound):
            await redeliver_event(session, await _operator(session_factory, world), uuid.uuid4())


async def test_redeliver_refuses_a_disabled_endpoint(
    world: World, session_factory: SessionFactory
) -> None:
    endpoint = await _endpoint(
        session_factory,
        world,
        "https://hooks.example.test/gone",
        disabled_at=datetime.now(UTC),
        disabled_reason="410 Gone",
    )
    event_id = await _event(session_factory, world, endpoint, "failed")
    async with session_factory.begin() as session:
        with pytest.raises(Conflict) as raised:
            await redeliver_event(session, await _operator(session_factory, world), event_id)
    assert raised.value.code == "endpoint_disabled"


async def test_redeliver_needs_an_admin_key(world: World, session_factory: SessionFactory) -> None:
    endpoint = await _endpoint(session_factory, world, "https://hooks.example.test/flaky")
    event_id = await _event(session_factory, world, endpoint, "failed")
    async with session_factory() as session:
        client_key = await session.scalar(select(ApiKey.id).where(ApiKey.is_admin.is_(False)))
    assert client_key is not None
    async with session_factory.begin() as session:
        with pytest.raises(NotFound):
            await redeliver_event(session, client_key, event_id)
        with pytest.raises(NotFound):
            await redeliver_event(session, uuid.uuid4(), event_id)
