"""The lost-message sweep is fair: messages waiting for their turn (a sender's pace) record when
they are next due, so the sweep selects only messages truly overdue, and a message whose enqueue
failed on an idle sender is not starved by a deferred backlog."""

from __future__ import annotations

from datetime import timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, update

from app.db.models import Message
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver
from app.delivery.sweep import sweep_once
from app.kernel.status import MessageStatus
from tests.conftest import World
from tests.domain.test_batch_delivery import FakeTwilio, dispatcher_for, fresh, fresh_batch
from tests.domain.test_delivery import POLICY
from tests.domain.test_dispatch import set_sender

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard


async def test_a_deferred_backlog_does_not_starve_a_message_whose_enqueue_failed(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    # A slow sender (one message every 10 s) with a backlog: its messages were created long ago
    # (so before the fix, when a put-back kept its old `next_attempt_at`, they were all
    # "overdue" and the oldest-first sweep picked them ahead of anything newer).
    await set_sender(session_factory, world.twilio_sender, rate_per_second=0.1)
    backlog = await fresh_batch(session_factory, world, 6)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(
                created_at=func.now() - timedelta(minutes=10),
                next_attempt_at=func.now() - timedelta(minutes=10),
            )
        )
    twilio = FakeTwilio()
    providers = twilio.providers()
    result = await deliver(
        list(backlog), session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )
    waiting = [i for i, o in result.outcomes.items() if o.status is MessageStatus.QUEUED]
    assert len(waiting) == 5  # one went; five wait for their turn, put back quietly

    # A message on an idle sender whose enqueue failed a minute ago (Redis was down).
    lost = await fresh(session_factory, world, "+14155550777", sender=world.fake_sender)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == lost)
            .values(next_attempt_at=func.now() - timedelta(minutes=1))
        )

    # Even with a batch smaller than the backlog, the lost message is picked, and only it.
    picked = await sweep_once(session_factory, grace=timedelta(0), limit=2)
    assert picked == [lost]

    # Each waiting message is due at its turn (10 s apart), not before.
    async with session_factory() as session:
        due_in = list(
            await session.scalars(
                select(func.extract("epoch", Message.next_attempt_at - func.now()))
                .where(Message.id.in_(waiting))
                .order_by(Message.next_attempt_at)
            )
        )
    assert len(due_in) == 5 and all(float(d) > 5 for d in due_in)

    # Once their turn (plus the grace) has passed with no job running them, they are overdue.
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id.in_(waiting))
            .values(next_attempt_at=Message.next_attempt_at - timedelta(minutes=5))
        )
    picked = await sweep_once(session_factory, grace=timedelta(seconds=30), limit=10)
    assert set(picked) == {*waiting, lost}
