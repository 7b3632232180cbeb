"""A client endpoint that is down or slow holds up neither SMS sending (events have their own
queue and worker) nor other clients' events (a per-endpoint limit on attempts in flight)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from app.cli.main import main
from app.db.models import Client, Message, WebhookEvent
from app.db.session import SessionFactory
from app.events.endpoints import Owner, set_default
from app.events.outbox import EventJob, emit_message_status, scheduled
from app.worker.events import EventsWorkerSettings
from app.worker.queue import create_queue, enqueue_events
from app.worker.tasks import WorkerSettings
from tests.conftest import TEST_REDIS_URL, World
from tests.events.conftest import StartReceiver
from tests.events.support import events_settings, hang, run_events_worker
from tests.test_end_to_end import run_worker


async def client_named(session_factory: SessionFactory, name: str) -> uuid.UUID:
    async with session_factory() as session:
        client_id = await session.scalar(select(Client.id).where(Client.name == name))
    assert client_id is not None
    return client_id


async def events_for(
    session_factory: SessionFactory, world: World, client_id: uuid.UUID, url: str, count: int
) -> list[EventJob]:
    """`count` delivered messages of a client, each with its event for `url`."""
    jobs: list[EventJob] = []
    async with session_factory.begin() as session:
        await set_default(session, Owner(client_id=client_id), url)
        for _ in range(count):
            message = Message(
                id=uuid.uuid4(),
                client_id=client_id,
                sender_id=world.fake_sender.id,
                to="+14155550123",
                from_=world.fake_sender.address,
                body="Your order has shipped.",
                encoding="GSM-7",
                segments=1,
                provider="fake",
                status="delivered",
            )
            session.add(message)
            await session.flush()
            await emit_message_status(session, message.id)
        jobs += scheduled(session)
    return jobs


async def enqueue(jobs: list[EventJob]) -> None:
    queue = create_queue(TEST_REDIS_URL)
    try:
        await enqueue_events(queue, jobs)
    finally:
        await queue.aclose(close_connection_pool=True)


async def test_a_dead_endpoint_does_not_slow_sending(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    receivers: StartReceiver,
    redis: Redis,
) -> None:
    dead = await receivers(default=hang())
    async with session_factory.begin() as session:
        await set_default(session, Owner(client_id=world.client_id), dead.url())
    for n in range(10):
        response = await api.post(
            "/v1/messages",
            json={"to": "+14155550123", "body": f"Order {n} shipped.", "from": "+14155550199"},
            headers=world.auth(),
        )
        assert response.status_code == 202
    # An events worker runs alongside, and is stuck on the dead endpoint as soon as it can be.
    stop = asyncio.Event()
    events_worker = asyncio.create_task(
        run_events_worker(
            events_settings(timeout_seconds=30, max_in_flight_per_endpoint=10), stop=stop
        )
    )
    started = time.monotonic()

    await run_worker()  # sends the ten, and applies the fake provider's delivery reports

    elapsed = time.monotonic() - started
    await dead.wait_for(1)
    await dead.stop()  # its attempts end (connection closed), and the events worker with them
    stop.set()
    await events_worker
    async with session_factory() as session:
        statuses = list(await session.scalars(select(Message.status)))
        pending = list(await session.scalars(select(WebhookEvent.status)))
    assert statuses == ["delivered"] * 10
    assert elapsed < 5.0  # nothing waited for the 30 s the dead endpoint takes per attempt
    assert len(pending) == 20 and set(pending) == {"pending"}  # sent + delivered, not delivered


async def _first_arrival_of_others(
    session_factory: SessionFactory,
    world: World,
    receivers: StartReceiver,
    *,
    limit: int,
    owner_limit: int = 100,
    url_per_message: bool = False,
) -> float:
    """Seconds until another client's events arrive while six events hang on a dead endpoint,
    with four worker slots and at most `limit` attempts per endpoint (`owner_limit` per client);
    `url_per_message`: each hanging event has its own URL (its own endpoint) on the dead host."""
    dead = await receivers(default=hang())
    alive = await receivers()
    if url_per_message:
        shop = []
        for order in range(6):
            shop += await events_for(
                session_factory, world, world.client_id, dead.url(f"/hook?order={order}"), 1
            )
    else:
        shop = await events_for(session_factory, world, world.client_id, dead.url(), 6)
    other = await events_for(
        session_factory, world, await client_named(session_factory, "other-shop"), alive.url(), 2
    )
    await enqueue(shop)  # first in the queue
    await enqueue(other)
    settings = events_settings(
        timeout_seconds=2.0, max_in_flight_per_endpoint=limit, max_in_flight_per_owner=owner_limit
    )
    started = time.monotonic()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_events_worker(settings, max_jobs=4, stop=stop))
    try:
        await alive.wait_for(2, timeout=10)
        return time.monotonic() - started
    finally:
        await dead.stop()  # its attempts end (connection closed), and the worker with them
        stop.set()
        await worker


async def test_a_dead_endpoint_does_not_delay_other_clients_events(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    waited = await _first_arrival_of_others(session_factory, world, receivers, limit=2)

    # Two slots hang on the dead endpoint; the other two serve everyone else at once.
    assert waited < 1.0


async def test_without_the_limit_the_dead_endpoint_would_take_every_slot(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    # The control for the test above: the same load with the limit out of the way.
    waited = await _first_arrival_of_others(session_factory, world, receivers, limit=100)

    assert waited >= 1.5  # the others waited for the first attempts to time out (2 s)


async def test_a_url_per_message_cannot_take_every_slot_either(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    # Six endpoints, one per message, all dead: the per-client limit still holds them to two.
    waited = await _first_arrival_of_others(
        session_factory, world, receivers, limit=2, owner_limit=2, url_per_message=True
    )

    assert waited < 1.0


def test_events_have_a_queue_and_a_worker_of_their_own(capsys: pytest.CaptureFixture[str]) -> None:
    sms_jobs = {getattr(f, "name", None) or f.__name__ for f in WorkerSettings.functions}
    event_jobs = {function.name for function in EventsWorkerSettings.functions}

    assert EventsWorkerSettings.queue_name == "arq:events"
    assert getattr(WorkerSettings, "queue_name", "arq:queue") == "arq:queue"
    assert event_jobs == {"deliver_event"} and not event_jobs & sms_jobs
    with pytest.raises(SystemExit) as done:
        main(["worker", "--help"])
    assert done.value.code == 0
    assert "--queue {sms,events}" in capsys.readouterr().out
