"""Status checks: a `sent` message whose final report never came (a lost callback) is asked about
at its provider, and what the provider says is applied like a callback."""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.delivery import reconcile
from app.delivery.reconcile import CheckSchedule, Decision, check_status, overdue_sent
from app.providers.base import Provider
from app.providers.fake import FakeProvider, FakeProviderSettings
from app.worker import guarantees
from app.worker.queue import close_queue, create_queue
from tests.conftest import TEST_REDIS_URL, TWILIO_TOKEN, World, make_settings
from tests.domain.test_delivery import RecordingProvider, history, load, queued_message
from tests.providers.test_twilio import message_body
from tests.providers.test_twilio_fetch import assert_valid_fetch_message

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

AFTER = timedelta(minutes=10)
SCHEDULE = CheckSchedule(after=AFTER)
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
    result = await check_status(message_id, session_factory, providers, SCHEDULE)
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

    assert await overdue_sent(session_factory, ["twilio"], SCHEDULE, limit=100) == [message_id]
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
    assert await overdue_sent(session_factory, ["twilio"], SCHEDULE, limit=100) == []


async def test_a_provider_that_cannot_answer_is_asked_again_next_period(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(lambda r: httpx.Response(401, json={"code": 20003}))
    message_id = await overdue(session_factory, world)

    assert await check(message_id, session_factory, provider.providers()) is Decision.NOTHING

    assert (await load(session_factory, message_id)).status == "sent"
    assert await checks(session_factory, message_id) == [None]
    assert await overdue_sent(session_factory, ["twilio"], SCHEDULE, limit=100) == []


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
    assert await overdue_sent(session_factory, askable, SCHEDULE, limit=100) == [quiet]
    assert await overdue_sent(session_factory, [], SCHEDULE, limit=100) == []


async def test_the_fake_reports_what_it_accepted_as_delivered(
    session_factory: SessionFactory, world: World
) -> None:
    fake = FakeProvider(FakeProviderSettings())
    message_id = await overdue(
        session_factory, world, sender=world.fake_sender, provider_message_id="fake-0123"
    )

    assert await overdue_sent(session_factory, ["fake"], SCHEDULE, limit=100) == [message_id]
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
    # Both picked, so both have their next check scheduled: neither is picked again now.
    assert (await overdue_sent(session_factory, ["twilio"], SCHEDULE, limit=1)) == []


async def travel(session_factory: SessionFactory, seconds: float) -> None:
    """Move every message's clock-based fields `seconds` into the past (time passes)."""
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(
                updated_at=Message.updated_at - timedelta(seconds=seconds),
                next_check_at=func.coalesce(
                    Message.next_check_at - timedelta(seconds=seconds), None
                ),
            )
        )


async def sweep_and_check(
    session_factory: SessionFactory, providers: dict[str, Provider], schedule: CheckSchedule
) -> list[uuid.UUID]:
    """What a sweep run picks, each then checked (as its job would)."""
    picked = await overdue_sent(session_factory, ["twilio"], schedule, limit=100)
    for message_id in picked:
        await check_status(message_id, session_factory, providers, schedule)
    return picked


async def test_a_message_that_stays_sent_is_checked_with_back_off_then_given_up_with_a_reason(
    session_factory: SessionFactory, world: World, app_factory: Any
) -> None:
    # Before: a message Twilio reports as `sent` for ever was asked about every period, for
    # ever (144 lookups and history rows a day at the default 10 minutes).
    schedule = CheckSchedule(
        after=AFTER, max_interval=timedelta(hours=6), horizon=timedelta(hours=72)
    )
    provider = twilio_fetch("sent")
    message_id = await overdue(session_factory, world, quiet_for=AFTER + timedelta(seconds=1))
    step = 300  # the sweep looks every 5 minutes of simulated time
    elapsed = 0
    checked_at: list[int] = []
    while elapsed < 80 * 3600:
        if await sweep_and_check(session_factory, provider.providers(), schedule):
            checked_at.append(elapsed)
        await travel(session_factory, step)
        elapsed += step

    gaps = [b - a for a, b in itertools.pairwise(checked_at)]
    # Each wait twice the one before, then at most six hours.
    assert gaps[:7] == [600, 1200, 2400, 4800, 9600, 19200, 21600]
    assert max(gaps) == 6 * 3600
    # Exactly the schedule the figures script prints (scripts/status-check-figures).
    assert checked_at == [int((o - AFTER).total_seconds()) for o in schedule.check_offsets()]
    assert schedule.lookups_per_day() == [9, 4, 4, 1]  # 18 in all, not 144 a day for ever
    # The last check is the first past the horizon: 72 hours without news.
    assert checked_at[-2] + 600 < 72 * 3600 <= checked_at[-1] + 600
    assert len(provider.requests) == len(checked_at) == 18
    message = await load(session_factory, message_id)
    assert message.status == "sent"
    assert message.status_checks == len(checked_at)
    assert message.status_detail is not None
    assert message.status_detail.startswith("status checks stopped: no final report within 72")
    assert "twilio holds it as sent" in message.status_detail
    # Visible in the API, and a final report that comes after all still applies and clears it.
    async with app_factory() as api:
        body = (await api.get(f"/v1/messages/{message_id}", headers=world.auth())).json()
    assert body["status_detail"] == message.status_detail
    await travel(session_factory, 30 * 24 * 3600)
    assert await overdue_sent(session_factory, ["twilio"], schedule, limit=100) == []


async def test_the_longest_due_go_first_so_stuck_messages_do_not_starve_new_ones(
    session_factory: SessionFactory, world: World
) -> None:
    # Before: oldest first by `updated_at`, which checks never change, 100 a sweep: once 100
    # messages stayed `sent` for good, a newer message whose report was lost was never checked.
    provider = twilio_fetch("sent")
    stuck = [await overdue(session_factory, world, quiet_for=timedelta(hours=5)) for _ in range(3)]
    for message_id in stuck:
        assert await check(message_id, session_factory, provider.providers()) is Decision.NOTHING
    lost = await overdue(session_factory, world, quiet_for=timedelta(minutes=11))

    assert await overdue_sent(session_factory, ["twilio"], SCHEDULE, limit=1) == [lost]


async def test_after_an_outage_checks_catch_up_at_the_configured_rate(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    # Before: at most 100 a minute, once a minute: 270 lost callbacks took minutes to recover.
    lost = [await overdue(session_factory, world) for _ in range(150)]
    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(status_check_rate_per_minute=600),
        "session_factory": session_factory,
        "providers": twilio_fetch("delivered").providers(),
        "redis": queue,
    }
    try:
        first = await guarantees.status_check_sweep(ctx)
        second = await guarantees.status_check_sweep(ctx)
        third = await guarantees.status_check_sweep(ctx)
    finally:
        await close_queue(queue)

    # 600 a minute, a sweep every 10 s: 100 a run, one every 0.1 s; the rest the next run.
    assert (first, second, third) == (100, 50, 0)
    scores = sorted([score for _, score in await redis.zrange("arq:queue", 0, -1, withscores=True)])
    assert len(scores) == 150
    spread = (scores[-1] - scores[0]) / 1000
    assert 9.8 <= spread <= 10.5  # spread over the sweep's period, not all at once
    # At most 10 lookups a second start (the first run's and the second's together: 20).
    assert sum(score < scores[0] + 1000 for score in scores) <= 20
    assert {job.decode().split(":", 1)[1] for job in await redis.zrange("arq:queue", 0, -1)} == {
        str(message_id) for message_id in lost
    }


async def test_the_sweeps_query_uses_its_index_on_a_seeded_table(
    session_factory: SessionFactory, world: World
) -> None:
    async with session_factory.begin() as session:
        # 100,000 messages: most delivered, 20,000 `sent` (mostly recent or already scheduled).
        await session.execute(
            text(
                """
                INSERT INTO messages (id, client_id, sender_id, "to", "from", body, encoding,
                    segments, status, provider, provider_message_id, updated_at, next_check_at)
                SELECT gen_random_uuid(), :client, :sender, '+14155550123', '+14155550100',
                    'x', 'GSM-7', 1,
                    CASE WHEN n % 5 = 0 THEN 'sent' ELSE 'delivered' END, 'twilio',
                    'SM' || n, now() - (n % 1000) * interval '1 minute',
                    CASE WHEN n % 10 = 0 THEN now() + interval '1 hour' END
                FROM generate_series(1, 100000) AS n
                """
            ),
            {"client": world.client_id, "sender": world.twilio_sender.id},
        )
        await session.execute(text("ANALYZE messages"))
    async with session_factory.begin() as session:
        plan = "\n".join(
            row[0]
            for row in await session.execute(
                text(
                    "EXPLAIN "
                    + reconcile._PICK_DUE.replace("$1", "ARRAY['twilio']")
                    .replace("$2", "'10 minutes'")
                    .replace("$3", "'6 hours'")
                    .replace("$4", "100")
                )
            )
        )
    assert "ix_messages_sent_check" in plan, plan
    assert "Seq Scan on messages" not in plan, plan
