"""Failing endpoints and events for an operator, and redelivery through app.events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from app.console.events_view import (
    failed_events,
    failing_endpoints,
    redeliver_event,
    retrying_events,
)
from app.db.models import ApiKey, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from app.events.outbox import scheduled
from app.kernel.errors import Conflict, NotFound
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
        endpoints = await failing_endpoints(session)
        page = await failed_events(session, limit=2)
        rest = await failed_events(session, after=page.next_cursor)
        only_gone = await failed_events(session, endpoint_id=gone)
        waiting = await retrying_events(session)

    assert [(e.id, e.failed_events) for e in endpoints] == [(gone, 0), (flaky, 2)]
    assert endpoints[0].disabled_reason == "410 Gone"
    assert endpoints[1].owner == "client shop"
    assert [event.id for event in page.events] == [second, first]
    assert page.next_cursor is not None
    assert len(rest.events) == 1 and rest.next_cursor is None  # the week-old one
    assert only_gone.events == []
    assert [event.id for event in waiting] == [retrying]
    assert waiting[0].next_attempt_at is not None


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
