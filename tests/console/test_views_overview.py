"""The overview: the last 24 hours by status, delivery rates, breakers, pauses, the queue."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from redis.asyncio import Redis

from app.console.overview import overview, traffic
from app.db.models import Message, Sender
from app.db.session import SessionFactory
from app.delivery.circuit import CircuitPolicy, ProviderHealth
from app.providers.base import ErrorKind, ProviderError
from app.worker.queue import READY_KEY, Queue, close_queue, create_queue
from tests.conftest import TEST_REDIS_URL, World


@pytest.fixture
async def queue(redis: Redis) -> AsyncIterator[Queue]:
    client = create_queue(TEST_REDIS_URL)
    yield client
    await close_queue(client)


async def _messages(
    sessions: SessionFactory,
    world: World,
    statuses: dict[str, int],
    *,
    sender: Sender | None = None,
    **fields: object,
) -> None:
    sender = sender or world.twilio_sender
    async with sessions.begin() as session:
        for status, count in statuses.items():
            for _ in range(count):
                session.add(
                    Message(
                        id=uuid.uuid4(),
                        client_id=world.client_id,
                        sender_id=sender.id,
                        to="+14155550123",
                        from_=sender.address,
                        body="hello",
                        encoding="GSM-7",
                        segments=1,
                        status=status,
                        provider=sender.provider,
                        **fields,
                    )
                )


async def test_traffic_counts_the_window_by_status_provider_and_sender(
    world: World, session_factory: SessionFactory
) -> None:
    await _messages(session_factory, world, {"delivered": 3, "failed": 1, "queued": 2})
    await _messages(
        session_factory, world, {"delivered": 1, "canceled": 2}, sender=world.vonage_sender
    )
    old = datetime.now(UTC) - timedelta(hours=25)
    await _messages(session_factory, world, {"failed": 5}, created_at=old)

    async with session_factory() as session:
        window = await traffic(session)

    assert window.total == 9
    counts = {row.status: row.count for row in window.by_status}
    assert counts == {"queued": 2, "delivered": 4, "failed": 1, "canceled": 2}
    assert [row.status for row in window.by_status] == ["queued", "delivered", "failed", "canceled"]
    assert sum(row.percent for row in window.by_status) == pytest.approx(100.0)
    rates = {rate.label: (rate.delivered, rate.settled) for rate in window.by_provider}
    assert rates == {"twilio": (3, 4), "vonage": (1, 1)}  # canceled counts on neither side
    by_sender = {rate.label: rate.percent for rate in window.by_sender}
    assert by_sender == {world.twilio_sender.address: 75.0, world.vonage_sender.address: 100.0}


async def test_an_empty_window(world: World, session_factory: SessionFactory) -> None:
    async with session_factory() as session:
        window = await traffic(session)
    assert (window.total, window.by_status, window.by_provider) == (0, [], [])


async def test_breakers_pauses_and_the_queue(
    world: World, session_factory: SessionFactory, queue: Queue
) -> None:
    health = ProviderHealth(queue, CircuitPolicy(failure_threshold=2))
    outage = ProviderError(ErrorKind.RETRYABLE, "down", provider_fault=True)
    for _ in range(2):
        await health.record("twilio", outage)
    await health.pause("vonage", 30.0)
    await cast(Awaitable[int], queue.rpush(READY_KEY, str(uuid.uuid4()), str(uuid.uuid4())))
    due = datetime.now(UTC) - timedelta(minutes=10)
    await _messages(session_factory, world, {"queued": 1}, created_at=due)

    seen = await overview(session_factory, queue, ["vonage", "twilio", "fake"])

    states = {state.provider: state for state in seen.providers}
    assert list(states) == ["fake", "twilio", "vonage"]
    assert states["twilio"].breaker == "open" and states["twilio"].open_for > 0
    assert states["vonage"].breaker == "closed" and 0 < states["vonage"].paused_for <= 30
    assert states["fake"].breaker == "closed" and states["fake"].paused_for == 0
    assert seen.queue.depth == 2.0
    assert 590 < seen.queue.oldest_queued_age < 700
    assert seen.queue.oldest_sending_age == 0.0
    assert seen.traffic.total == 1


async def test_redis_down_reads_as_unknown(world: World, session_factory: SessionFactory) -> None:
    dead = create_queue("redis://127.0.0.1:1/0")
    try:
        seen = await overview(session_factory, dead, ["twilio"])
    finally:
        await close_queue(dead)
    assert [state.breaker for state in seen.providers] == ["unknown"]
    assert seen.queue.depth is None
