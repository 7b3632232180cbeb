"""Status checks: a `sent` message whose final report never came (a lost callback) is asked about
at its provider, and what the provider says is applied like a callback."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select, update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.domain.reconcile import Decision, check_status, overdue_sent
from app.providers.base import Provider
from app.providers.fake import FakeProvider
from app.settings import FakeProviderSettings
from app.worker import guarantees
from app.worker.queue import close_queue, create_queue
from tests.conftest import TEST_REDIS_URL, TWILIO_TOKEN, World, make_settings
from tests.domain.test_delivery import RecordingProvider, history, load, queued_message
from tests.providers.test_twilio import message_body
from tests.providers.test_twilio_fetch import assert_valid_fetch_message

AFTER = timedelta(minutes=10)
SID = "SM" + "cd" * 16


async def overdue(
    session_factory: SessionFactory,
    world: World,
    *,
    quiet_for: timedelta = timedelta(minutes=20),
    **fields: Any,
) -> uuid.UUID:
    """A `sent` message with nothing heard for `quiet_for`."""
    fields.setdefault("provider_message_id", SID)
    message_id = await queued_message(session_factory, world, status="sent", attempts=1, **fields)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(updated_at=func.now() - quiet_for)
        )
    return message_id


def twilio_fetch(status: str, **changes: Any) -> RecordingProvider:
    def handler(request: httpx.Request) -> httpx.Response:
        sid = assert_valid_fetch_message(request, TWILIO_TOKEN)
        return httpx.Response(200, json=message_body(sid=sid, status=status, **changes))

    return RecordingProvider(handler)


async def check(
    message_id: uuid.UUID, session_factory: SessionFactory, providers: dict[str, Provider]
) -> Decision:
    result = await check_status(message_id, session_factory, providers, older_than=AFTER)
    return result.decision


async def checks(session_factory: SessionFactory, message_id: uuid.UUID) -> list[str | None]:
    async with session_factory() as session:
        return list(
            await session.scalars(
                select(MessageEvent.provider_status).where(
                    MessageEvent.message_id == message_id, MessageEvent.source == "status_check"
                )
            )
        )


async def test_a_lost_final_callback_is_recovered_from_twilio(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_fetch("delivered")
    message_id = await overdue(session_factory, world)

    assert await overdue_sent(session_factory, ["twilio"], AFTER) == [message_id]
    assert await check(message_id, session_factory, provider.providers()) is Decision.SETTLED

    assert (await load(session_factory, message_id)).status == "delivered"
    assert await history(session_factory, message_id) == ["delivered"]
    assert [r.method for r in provider.requests] == ["GET"]


async def test_a_failure_twilio_reports_is_applied_with_its_error(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_fetch("undelivered", error_code=30003, error_message="Unreachable")
    message_id = await overdue(session_factory, world)

    assert await check(message_id, session_factory, provider.providers()) is Decision.SETTLED
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("undelivered", "30003")


async def test_still_sent_is_recorded_and_not_asked_again_within_the_period(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_fetch("sent")
    message_id = await overdue(session_factory, world)

    assert await check(message_id, session_factory, provider.providers()) is Decision.NOTHING

    assert (await load(session_factory, message_id)).status == "sent"
    assert await checks(session_factory, message_id) == ["sent"]
    assert await overdue_sent(session_factory, ["twilio"], AFTER) == []


async def test_a_provider_that_cannot_answer_is_asked_again_next_period(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(lambda r: httpx.Response(401, json={"code": 20003}))
    message_id = await overdue(session_factory, world)

    assert await check(message_id, session_factory, provider.providers()) is Decision.NOTHING

    assert (await load(session_factory, message_id)).status == "sent"
    assert await checks(session_factory, message_id) == [None]
    assert await overdue_sent(session_factory, ["twilio"], AFTER) == []


async def test_only_quiet_messages_at_providers_that_can_be_asked_are_picked(
    session_factory: SessionFactory, world: World
) -> None:
    quiet = await overdue(session_factory, world)
    await overdue(session_factory, world, quiet_for=timedelta(minutes=1))  # recently updated
    await overdue(session_factory, world, sender=world.vonage_sender)  # not asked (no lookup)
    await queued_message(session_factory, world, status="delivered", provider_message_id=SID)
    providers = RecordingProvider(lambda r: httpx.Response(500)).providers()
    askable = [name for name, p in providers.items() if p.can_fetch_status]

    assert askable == ["twilio"]
    assert await overdue_sent(session_factory, askable, AFTER) == [quiet]
    assert await overdue_sent(session_factory, [], AFTER) == []


async def test_the_fake_reports_what_it_accepted_as_delivered(
    session_factory: SessionFactory, world: World
) -> None:
    fake = FakeProvider(FakeProviderSettings())
    message_id = await overdue(
        session_factory, world, sender=world.fake_sender, provider_message_id="fake-0123"
    )

    assert await overdue_sent(session_factory, ["fake"], AFTER) == [message_id]
    assert await check(message_id, session_factory, {"fake": fake}) is Decision.SETTLED
    assert (await load(session_factory, message_id)).status == "delivered"


async def test_the_sweep_enqueues_a_bounded_batch_of_checks(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    older = await overdue(session_factory, world, quiet_for=timedelta(minutes=30))
    newer = await overdue(session_factory, world)
    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(status_check_after_seconds=600),
        "session_factory": session_factory,
        "providers": twilio_fetch("delivered").providers(),
        "redis": queue,
    }
    try:
        first = await guarantees.status_check_sweep(ctx)
        again = await guarantees.status_check_sweep(ctx)  # already queued: deduped by job id
        decision = await guarantees.status_check(ctx, str(older))
    finally:
        await close_queue(queue)

    assert (first, again) == (2, 0)
    # The sweep also set the gauge of the oldest `sent` message (30 minutes quiet).
    assert (
        1800 <= (REGISTRY.get_sample_value("smsgate_oldest_sent_message_age_seconds") or 0) < 1860
    )
    for message_id in (older, newer):
        assert await redis.zscore("arq:queue", f"status-check:{message_id}") is not None
    assert decision == Decision.SETTLED.value
    assert (await load(session_factory, older)).status == "delivered"
    assert (await overdue_sent(session_factory, ["twilio"], AFTER, limit=1)) == [newer]
