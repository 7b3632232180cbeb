"""Reconciliation of `sending` messages whose outcome is unknown: ask the provider, then record
what it holds, resubmit (a recorded attempt), or give up without resending."""

from __future__ import annotations

import uuid
from datetime import timedelta
from email.utils import format_datetime
from typing import Any
from unittest.mock import patch
from urllib.parse import parse_qs

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver_message
from app.delivery.reconcile import Decision, reconcile_message, stale_claims
from app.kernel.status import MessageStatus
from app.providers.base import Provider
from app.providers.fake import FakeProvider, FakeProviderSettings
from app.worker import guarantees
from app.worker.guarantees import RedisFakeLedger
from app.worker.queue import close_queue, create_queue, enqueue_deliveries
from tests.conftest import TEST_REDIS_URL, TWILIO_SID, World, make_settings
from tests.domain.test_delivery import (
    POLICY,
    RecordingProvider,
    history,
    load,
    queued_message,
    twilio_created,
)

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

STALE = timedelta(seconds=30)
GIVE_UP = timedelta(minutes=15)
FOUND_SID = "SM" + "cd" * 16


async def stale_sending(
    session_factory: SessionFactory, world: World, *, claimed_ago: timedelta, **fields: Any
) -> uuid.UUID:
    """A message left `sending` by attempt 1, claimed `claimed_ago`."""
    message_id = await queued_message(session_factory, world, **fields)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(
                status="sending",
                attempts=fields.get("attempts", 1),
                claimed_at=func.now() - claimed_ago,
            )
        )
    return message_id


def twilio_listing(*messages: dict[str, Any]) -> RecordingProvider:
    """Twilio answering every ListMessage with `messages` (and creating on POST)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return twilio_created(request)
        return httpx.Response(200, json={"messages": list(messages), "next_page_uri": None})

    return RecordingProvider(handler)


def listed(sid: str = FOUND_SID, status: str = "sent", **changes: Any) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "sid": sid,
        "account_sid": TWILIO_SID,
        "to": "+14155550123",
        "from": "+14155550100",
        "body": "Your order #1042 has shipped.",
        "status": status,
        "direction": "outbound-api",
        "date_created": format_datetime(datetime.now(UTC), usegmt=True),
        **changes,
    }


async def reconcile(
    message_id: uuid.UUID, session_factory: SessionFactory, providers: dict[str, Provider]
) -> Decision:
    result = await reconcile_message(
        message_id, session_factory, providers, POLICY, older_than=STALE, give_up_after=GIVE_UP
    )
    return result.decision


async def test_stale_claims_are_sending_messages_older_than_a_job(
    session_factory: SessionFactory, world: World
) -> None:
    stale = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))
    await stale_sending(session_factory, world, claimed_ago=timedelta(seconds=5))
    await queued_message(session_factory, world)

    assert await stale_claims(session_factory, STALE) == [stale]


async def test_a_message_twilio_has_is_recorded_as_sent_with_its_sid(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing(listed())
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))

    decision = await reconcile(message_id, session_factory, provider.providers())

    assert decision is Decision.SETTLED
    message = await load(session_factory, message_id)
    assert (message.status, message.provider_message_id) == ("sent", FOUND_SID)
    assert [r.method for r in provider.requests] == ["GET", "GET"]  # nothing was sent
    parse = parse_qs(provider.requests[0].url.query.decode())
    assert parse["To"] == ["+14155550123"] and parse["From"] == ["+14155550100"]


async def test_a_message_twilio_already_delivered_ends_delivered(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing(listed(status="delivered"))
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))

    await reconcile(message_id, session_factory, provider.providers())

    assert (await load(session_factory, message_id)).status == "delivered"


async def test_a_message_twilio_never_got_is_resubmitted_as_a_new_attempt(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing()
    providers = provider.providers()
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))

    decision = await reconcile(message_id, session_factory, providers)
    requeued = await load(session_factory, message_id)
    outcome = await deliver_message(message_id, session_factory, providers, POLICY)

    assert decision is Decision.RESUBMIT
    assert (requeued.status, requeued.resubmissions) == ("queued", 1)
    assert outcome.status is MessageStatus.SENT
    message = await load(session_factory, message_id)
    assert (message.attempts, message.resubmissions) == (2, 1)
    assert [r.method for r in provider.requests] == ["GET", "GET", "POST"]
    async with session_factory() as session:
        reasons = list(
            await session.scalars(
                select(MessageEvent.detail).where(MessageEvent.source == "reconcile")
            )
        )
    assert reasons == [
        "twilio has no record of attempt 1, whose outcome was unknown: submitting again"
    ]


async def test_a_sid_another_message_holds_is_not_taken(
    session_factory: SessionFactory, world: World
) -> None:
    # An identical body to the same number, sent earlier and recorded with this SID.
    await queued_message(session_factory, world, status="sent", provider_message_id=FOUND_SID)
    provider = twilio_listing(listed())
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))

    assert await reconcile(message_id, session_factory, provider.providers()) is Decision.RESUBMIT


async def test_a_claim_that_is_not_stale_yet_is_left_alone(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing()
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(seconds=5))

    assert await reconcile(message_id, session_factory, provider.providers()) is Decision.NOTHING
    assert provider.requests == []


async def test_when_twilio_cannot_answer_it_is_asked_again_later(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(lambda r: httpx.Response(503, json={"code": 20503}))
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))

    result = await reconcile_message(
        message_id,
        session_factory,
        provider.providers(),
        POLICY,
        older_than=STALE,
        give_up_after=GIVE_UP,
    )

    assert result.decision is Decision.LATER and result.retry_in
    assert (await load(session_factory, message_id)).status == "sending"


async def test_after_the_last_attempt_a_lost_submission_fails(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing()
    message_id = await stale_sending(
        session_factory, world, claimed_ago=timedelta(minutes=1), attempts=POLICY.max_attempts
    )

    assert await reconcile(message_id, session_factory, provider.providers()) is Decision.FAILED
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("failed", "not_submitted")


async def test_vonage_cannot_be_asked_so_the_message_waits_then_fails_unsent(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(lambda r: httpx.Response(500))
    providers = provider.providers()
    recent = await stale_sending(
        session_factory, world, claimed_ago=timedelta(minutes=1), sender=world.vonage_sender
    )
    old = await stale_sending(
        session_factory, world, claimed_ago=timedelta(minutes=20), sender=world.vonage_sender
    )

    waiting = await reconcile_message(
        recent, session_factory, providers, POLICY, older_than=STALE, give_up_after=GIVE_UP
    )
    given_up = await reconcile(old, session_factory, providers)

    assert waiting.decision is Decision.LATER
    assert waiting.retry_in is not None and 13 * 60 < waiting.retry_in <= 14 * 60
    assert given_up is Decision.FAILED
    message = await load(session_factory, old)
    assert (message.status, message.error_code) == ("failed", "outcome_unknown")
    assert provider.requests == []  # never resent
    assert await history(session_factory, old) == ["failed"]


async def test_a_report_that_arrives_first_wins(
    session_factory: SessionFactory, world: World
) -> None:
    provider = twilio_listing()
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))
    async with session_factory.begin() as session:  # Twilio's callback, just before
        await session.execute(
            text("UPDATE messages SET status = 'delivered' WHERE id = :id"), {"id": message_id}
        )

    assert await reconcile(message_id, session_factory, provider.providers()) is Decision.NOTHING
    assert (await load(session_factory, message_id)).status == "delivered"


async def test_the_fake_provider_is_asked_through_its_ledger(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    ledger = RedisFakeLedger(redis)
    fake = FakeProvider(FakeProviderSettings(delivery_delay_seconds=0), ledger=ledger)
    providers: dict[str, Provider] = {"fake": fake}
    sent = await queued_message(session_factory, world, sender=world.fake_sender)
    await deliver_message(sent, session_factory, providers, POLICY)
    # As if the worker died after the fake accepted it, before recording that.
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == sent)
            .values(status="sending", claimed_at=func.now() - timedelta(minutes=1))
        )
    lost = await stale_sending(
        session_factory, world, claimed_ago=timedelta(minutes=1), sender=world.fake_sender
    )

    assert await reconcile(sent, session_factory, providers) is Decision.SETTLED
    assert await reconcile(lost, session_factory, providers) is Decision.RESUBMIT
    assert (await load(session_factory, sent)).status == "delivered"


async def test_a_lookup_that_keeps_failing_ends_outcome_unknown_and_never_resends(
    session_factory: SessionFactory, world: World
) -> None:
    # Bad credentials: Twilio answers every lookup 401 (code 20003).
    provider = RecordingProvider(
        lambda r: httpx.Response(401, json={"code": 20003, "message": "Authenticate"})
    )
    providers = provider.providers()
    recent = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))
    old = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=20))

    waiting = await reconcile_message(
        recent, session_factory, providers, POLICY, older_than=STALE, give_up_after=GIVE_UP
    )
    again = await reconcile_message(
        recent, session_factory, providers, POLICY, older_than=STALE, give_up_after=GIVE_UP
    )
    given_up = await reconcile(old, session_factory, providers)

    assert waiting.decision is Decision.LATER and waiting.retry_in
    assert again.decision is Decision.LATER
    assert (await load(session_factory, recent)).status == "sending"
    assert given_up is Decision.FAILED
    message = await load(session_factory, old)
    assert (message.status, message.error_code) == ("failed", "outcome_unknown")
    assert message.error_message is not None and "could not be asked" in message.error_message
    assert {r.method for r in provider.requests} == {"GET"}  # never resent
    assert await history(session_factory, old) == ["failed"]


async def test_an_unexpected_lookup_error_follows_the_same_rule(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    class Broken(FakeProvider):
        async def find_submissions(self, sms: Any, since: Any) -> Any:
            raise RuntimeError("a bug")

    fake = Broken(FakeProviderSettings(), ledger=RedisFakeLedger(redis))
    message_id = await stale_sending(
        session_factory, world, claimed_ago=timedelta(minutes=20), sender=world.fake_sender
    )

    assert await reconcile(message_id, session_factory, {"fake": fake}) is Decision.FAILED
    assert (await load(session_factory, message_id)).error_code == "outcome_unknown"


async def test_a_resubmission_is_enqueued_although_the_dead_workers_job_key_remains(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    provider = twilio_listing()
    message_id = await stale_sending(session_factory, world, claimed_ago=timedelta(minutes=1))
    # The first attempt's job, as a worker killed mid-job leaves it.
    await redis.set(f"arq:job:deliver:{message_id}", b"stale", ex=3600)
    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(),
        "session_factory": session_factory,
        "providers": provider.providers(),
        "retry_policy": POLICY,
        "redis": queue,
    }
    try:
        with patch("app.worker.guarantees.delivery_job_timeout_seconds", return_value=30):
            decision = await guarantees.reconcile(ctx, str(message_id))
        # Enqueueing it again under the same resubmission id queues nothing more.
        again = await enqueue_deliveries(queue, [message_id], resubmission=1)
    finally:
        await close_queue(queue)

    assert decision == Decision.RESUBMIT.value
    assert await redis.zscore("arq:queue", f"deliver:{message_id}:r1") is not None
    assert await redis.zscore("arq:queue", f"deliver:{message_id}") is None
    assert again == 0
    assert (await load(session_factory, message_id)).resubmissions == 1
