"""Recovery through a real arq worker: a claim a dead worker left behind is found by the
reconcile sweep, asked about at the provider, and resubmitted or recorded."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, update

from app.db.models import Message
from app.db.session import SessionFactory
from app.worker.guarantees import delivery_job_timeout_seconds, reconcile_sweep
from app.worker.queue import create_queue
from tests.conftest import TEST_REDIS_URL, World, make_settings
from tests.domain.test_delivery import RecordingProvider, load, queued_message, twilio_created
from tests.test_end_to_end import run_worker


async def left_behind(session_factory: SessionFactory, world: World) -> uuid.UUID:
    """A message whose worker died mid-call: `sending`, claimed longer ago than a job lasts."""
    message_id = await queued_message(session_factory, world)
    stale = timedelta(seconds=delivery_job_timeout_seconds(make_settings()) + 5)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(status="sending", attempts=1, claimed_at=func.now() - stale)
        )
    return message_id


async def sweep(session_factory: SessionFactory) -> int:
    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(),
        "session_factory": session_factory,
        "redis": queue,
    }
    try:
        return await reconcile_sweep(ctx)
    finally:
        await queue.aclose(close_connection_pool=True)


async def test_a_dead_workers_claim_is_resubmitted_when_twilio_never_got_it(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    def twilio(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"messages": [], "next_page_uri": None})
        return twilio_created(request)

    provider = RecordingProvider(twilio)
    message_id = await left_behind(session_factory, world)
    in_flight = await queued_message(session_factory, world)
    async with session_factory.begin() as session:  # claimed just now: its worker is on it
        await session.execute(
            update(Message)
            .where(Message.id == in_flight)
            .values(status="sending", attempts=1, claimed_at=func.now())
        )

    assert await sweep(session_factory) == 1
    await run_worker(provider)

    message = await load(session_factory, message_id)
    assert (message.status, message.attempts, message.resubmissions) == ("sent", 2, 1)
    assert [r.method for r in provider.requests] == ["GET", "GET", "POST"]  # asked, then sent
    assert (await load(session_factory, in_flight)).status == "sending"


async def test_a_dead_workers_claim_is_recorded_when_twilio_has_it(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    sid = "SM" + "ef" * 16

    def twilio(request: httpx.Request) -> httpx.Response:
        from datetime import UTC, datetime
        from email.utils import format_datetime

        listed = {
            "sid": sid,
            "to": "+14155550123",
            "from": "+14155550100",
            "body": "Your order #1042 has shipped.",
            "status": "delivered",
            "direction": "outbound-api",
            "date_created": format_datetime(datetime.now(UTC), usegmt=True),
        }
        return httpx.Response(200, json={"messages": [listed], "next_page_uri": None})

    provider = RecordingProvider(twilio)
    message_id = await left_behind(session_factory, world)

    await sweep(session_factory)
    await run_worker(provider)

    message = await load(session_factory, message_id)
    assert (message.status, message.provider_message_id, message.attempts) == (
        "delivered",
        sid,
        1,
    )
    assert all(r.method == "GET" for r in provider.requests)
