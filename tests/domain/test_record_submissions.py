"""record_submissions / submit: recording the provider's acceptance when a delivery report got
there first (both delivery paths), or when a later attempt owns the message."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.delivery.pipeline import (
    Outcome,
    Submitted,
    deliver_message,
    record_submissions,
    submit,
)
from app.delivery.pipeline import deliver as deliver_batch
from app.delivery.transitions import record_status_report
from app.kernel.status import MessageStatus
from app.providers.base import Accepted, StatusReport
from tests.conftest import World
from tests.domain.test_batch_delivery import FakeTwilio, dispatcher_for, fresh, number
from tests.domain.test_delivery import POLICY, history, load, twilio_error

Deliver = Callable[..., Awaitable[Outcome]]


async def one_by_one(message_id: uuid.UUID, *args: Any) -> Outcome:
    return await deliver_message(message_id, *args)


async def as_a_batch(message_id: uuid.UUID, *args: Any) -> Outcome:
    return (await deliver_batch([message_id], *args)).outcomes[message_id]


async def sent_events(session_factory: SessionFactory, message_id: uuid.UUID) -> list[bool]:
    async with session_factory() as session:
        return list(
            await session.scalars(
                select(MessageEvent.applied).where(
                    MessageEvent.message_id == message_id, MessageEvent.status == "sent"
                )
            )
        )


@pytest.mark.parametrize("deliver", [one_by_one, as_a_batch])
async def test_a_delivery_report_before_the_acceptance_is_recorded_stays_delivered(
    session_factory: SessionFactory, world: World, redis: Redis, deliver: Deliver
) -> None:
    message_id = await fresh(session_factory, world, number(1))

    async def report_arrives(request: httpx.Request) -> None:
        # The handset was fast: Twilio's callback lands while our request is still open.
        applied, _ = await record_status_report(
            session_factory,
            "twilio",
            StatusReport(
                provider_message_id=twilio.sids[number(1)],
                provider_status="delivered",
                status=MessageStatus.DELIVERED,
                message_id=message_id,
            ),
        )
        assert applied

    twilio = FakeTwilio(during=report_arrives)
    providers = twilio.providers()

    outcome = await deliver(
        message_id, session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    assert outcome.status is None  # nothing moved to `sent`
    message = await load(session_factory, message_id)
    assert message.status == "delivered"
    assert message.provider_message_id == twilio.sids[number(1)]
    assert await history(session_factory, message_id) == ["sending", "delivered"]
    assert await sent_events(session_factory, message_id) == [False]  # kept, not applied
    assert len(twilio.requests) == 1


async def test_a_late_acceptance_stores_the_provider_id_without_moving_the_status(
    session_factory: SessionFactory, world: World
) -> None:
    """A report without the provider's id (none matched it yet) moved the message on."""
    late = await fresh(session_factory, world, number(1), status="delivered", attempts=1)
    current = await fresh(session_factory, world, number(2), status="sending", attempts=1)
    messages = [await load(session_factory, late), await load(session_factory, current)]

    moved, _ = await record_submissions(
        session_factory,
        [
            Submitted(messages[0], "twilio", Accepted("SM-late")),
            Submitted(messages[1], "twilio", Accepted("SM-current")),
        ],
    )

    assert moved == {current}
    stored = [await load(session_factory, i) for i in (late, current)]
    assert [(m.status, m.provider_message_id) for m in stored] == [
        ("delivered", "SM-late"),
        ("sent", "SM-current"),
    ]
    assert await sent_events(session_factory, late) == [False]
    assert await sent_events(session_factory, current) == [True]


async def test_an_acceptance_of_an_earlier_attempt_does_not_move_a_later_one(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await fresh(session_factory, world, number(1), status="sending", attempts=1)
    first_attempt = await load(session_factory, message_id)
    async with session_factory.begin() as session:  # reconciled, then claimed again
        await session.execute(update(Message).where(Message.id == message_id).values(attempts=2))

    moved, _ = await record_submissions(
        session_factory, [Submitted(first_attempt, "twilio", Accepted("SM-first"))]
    )

    assert moved == set()
    message = await load(session_factory, message_id)
    assert (message.status, message.attempts) == ("sending", 2)


async def test_submit_returns_the_acceptance_and_records_nothing_itself(
    session_factory: SessionFactory, world: World
) -> None:
    """`submit` leaves the recording of an acceptance to `record_submissions` (the batch
    records many in one transaction); a refusal it records itself."""
    accepted_id = await fresh(session_factory, world, number(1), status="sending", attempts=1)
    refused_id = await fresh(session_factory, world, number(2), status="sending", attempts=1)
    twilio = FakeTwilio({number(2): twilio_error(400, 21211, "The 'To' number is not valid.")})
    provider = twilio.providers()["twilio"]

    accepted = await submit(
        await load(session_factory, accepted_id), provider, session_factory, POLICY, None
    )
    refused = await submit(
        await load(session_factory, refused_id), provider, session_factory, POLICY, None
    )

    assert isinstance(accepted, Submitted)
    assert accepted.accepted.provider_message_id == twilio.sids[number(1)]
    assert (await load(session_factory, accepted_id)).status == "sending"  # not yet recorded
    assert refused == Outcome(MessageStatus.FAILED)
    assert (await load(session_factory, refused_id)).status == "failed"
