"""deliver_batch: the common case of a batch of fresh messages goes together (one read, one
claim, one record); every unusual message falls back to `deliver_message`. Real PostgreSQL and
Redis; Twilio's CreateMessage faked at the HTTP boundary."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, text

from app.consent.optouts import lock_recipients
from app.db import session as db_session
from app.db.models import Message, MessageEvent, OptOut, Sender, WebhookEndpoint
from app.db.session import SessionFactory
from app.delivery import transitions
from app.delivery.circuit import CircuitState
from app.delivery.dispatch import Dispatcher
from app.delivery.pipeline import Outcome, deliver_message
from app.delivery.pipeline import deliver as deliver_batch
from app.kernel.metrics import DB_STATEMENTS
from app.kernel.status import MessageStatus
from app.providers.base import ErrorKind, Provider, ProviderError
from app.providers.twilio import TwilioProvider, TwilioSettings
from app.worker.guarantees import build_dispatcher
from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, World, make_settings
from tests.domain.test_delivery import POLICY, history, load, twilio_error
from tests.domain.test_dispatch import open_circuit, set_sender
from tests.netguard import NetworkGuard

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

Answer = Callable[[httpx.Request], httpx.Response]


class FakeTwilio:
    """Twilio's CreateMessage at the HTTP boundary: answers per recipient (201 with a fresh
    `sid` unless told otherwise), and keeps each request with the time it arrived."""

    def __init__(
        self,
        answers: dict[str, Answer] | None = None,
        *,
        delay: float = 0.0,
        during: Callable[[httpx.Request], Awaitable[None]] | None = None,
    ) -> None:
        self.answers = answers or {}
        self.delay = delay
        self.during = during
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []
        self.sids: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            form = parse_qs(request.content.decode())
            answer = self.answers.get(form["To"][0])
            sid = "SM" + uuid.uuid4().hex
            if answer is None:
                self.sids[form["To"][0]] = sid
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.during is not None:
                await self.during(request)
            if answer is not None:
                return answer(request)
            return httpx.Response(
                201,
                json={
                    "sid": sid,
                    "account_sid": TWILIO_SID,
                    "status": "queued",
                    "to": form["To"][0],
                    "from": form["From"][0],
                    "body": form["Body"][0],
                },
            )
        finally:
            self.in_flight -= 1

    def providers(self) -> dict[str, Provider]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return {
            "twilio": TwilioProvider(
                make_settings().section("twilio", TwilioSettings), http, PUBLIC_BASE_URL
            )
        }

    def recipients(self) -> list[str]:
        return [parse_qs(r.content.decode())["To"][0] for r in self.requests]


def number(n: int) -> str:
    return f"+1415555{n:04d}"


async def fresh(
    session_factory: SessionFactory,
    world: World,
    to: str,
    sender: Sender | None = None,
    **fields: Any,
) -> uuid.UUID:
    """A message as the API stores it: queued, due now."""
    sender = sender or world.twilio_sender
    message = Message(
        id=uuid.uuid4(),
        client_id=world.client_id,
        sender_id=sender.id,
        to=to,
        from_=sender.address,
        body="Your code is 1042.",
        encoding="GSM-7",
        segments=1,
        provider=sender.provider,
        **{"status": "queued", **fields},
    )
    async with session_factory.begin() as session:
        session.add(message)
    return message.id


async def fresh_expired(session_factory: SessionFactory, world: World, to: str) -> uuid.UUID:
    """A queued message whose validity period ended a second ago."""
    return await fresh(
        session_factory,
        world,
        to,
        validity_period=60,
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
    )


async def fresh_batch(
    session_factory: SessionFactory, world: World, count: int, first: int = 100
) -> dict[uuid.UUID, str]:
    """`count` fresh messages to distinct recipients: id -> recipient."""
    batch = {}
    for n in range(first, first + count):
        batch[await fresh(session_factory, world, number(n))] = number(n)
    return batch


def dispatcher_for(redis: Redis, providers: dict[str, Provider], **settings: Any) -> Dispatcher:
    return build_dispatcher(redis, make_settings(**settings), providers)


async def test_a_batch_goes_together_each_message_sent_once_with_its_own_sid(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 8)

    result = await deliver_batch(
        list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    assert {i: o.status for i, o in result.outcomes.items()} == dict.fromkeys(
        batch, MessageStatus.SENT
    )
    assert all(o.retry_in is None for o in result.outcomes.values())
    assert sorted(twilio.recipients()) == sorted(batch.values())  # each called exactly once
    for message_id, to in batch.items():
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("sent", 1)
        # The batched UPDATE gave each message the sid its own request got back.
        assert message.provider_message_id == twilio.sids[to]
        assert await history(session_factory, message_id) == ["sending", "sent"]


async def test_a_jobs_statements_do_not_grow_with_its_size_when_answers_come_together(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """One claim for the job; acceptances that arrive together share a record: a job of
    twelve costs less than one statement more per extra message than a job of two."""
    await set_sender(session_factory, world.twilio_sender, rate_per_second=10_000)
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    small = await fresh_batch(session_factory, world, 2, first=100)
    large = await fresh_batch(session_factory, world, 12, first=200)

    costs = []
    for batch in (small, large):
        before = DB_STATEMENTS._value.get()
        await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)
        costs.append(DB_STATEMENTS._value.get() - before)

    assert len(twilio.requests) == 14
    assert costs[1] - costs[0] < 12 - 2


async def test_an_opted_out_recipient_is_canceled_while_the_others_go(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 4)
    stopped_id, stopped = next(iter(batch.items()))
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone=stopped, sender_id=world.twilio_sender.id, action="opt_out", source="keyword"
            )
        )

    result = await deliver_batch(
        list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    assert stopped not in twilio.recipients()
    assert sorted(twilio.recipients()) == sorted(to for to in batch.values() if to != stopped)
    await assert_canceled_for_the_opt_out(session_factory, result, stopped_id)
    for message_id in batch.keys() - {stopped_id}:
        assert (await load(session_factory, message_id)).status == "sent"


async def assert_canceled_for_the_opt_out(
    session_factory: SessionFactory, result: Any, message_id: uuid.UUID
) -> None:
    """The message ended `canceled` by the claim for its recipient's opt-out, never tried."""
    assert result.outcomes[message_id].status is MessageStatus.CANCELED
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code, message.attempts) == (
        "canceled",
        "recipient_opted_out",
        0,
    )
    assert await history(session_factory, message_id) == ["canceled"]


async def test_a_stop_recorded_while_the_claim_waits_for_the_recipients_lock_is_seen(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """The claim's one statement takes the recipients' locks, then claims with a snapshot taken
    after them: a STOP whose transaction held a lock, and committed while the claim waited,
    cancels that message instead of sending it (a claim reading opt-outs with a snapshot from
    before the wait would send it); the other recipient's message goes."""
    twilio = FakeTwilio()
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 2, first=300)
    (stopped_id, stopped), (other_id, other) = batch.items()

    async with session_factory.begin() as holder:  # the STOP's transaction
        await lock_recipients(holder, [stopped])
        task = asyncio.create_task(
            deliver_batch(
                list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
            )
        )
        await claim_waiting_for_a_lock(session_factory)
        holder.add(
            OptOut(
                phone=stopped, sender_id=world.twilio_sender.id, action="opt_out", source="keyword"
            )
        )
    result = await task

    assert twilio.recipients() == [other]
    await assert_canceled_for_the_opt_out(session_factory, result, stopped_id)
    assert (await load(session_factory, other_id)).status == "sent"


async def test_a_message_queued_again_while_the_claim_waits_is_not_claimed_without_its_lock(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """The claim locks the recipients of the messages queued when it began, and claims only
    those: a message another attempt held then (`sending`), put back while the claim waited
    for another recipient's lock, is left to a later job (its recipient was never locked, so a
    STOP being recorded for it meanwhile would not be waited for)."""
    twilio = FakeTwilio()
    providers = twilio.providers()
    waiting_id = await fresh(session_factory, world, number(401))
    held_id = await fresh(session_factory, world, number(402), status="sending", attempts=1)

    async with session_factory.begin() as holder:  # e.g. a STOP for the first recipient
        await lock_recipients(holder, [number(401)])
        task = asyncio.create_task(
            deliver_batch(
                [waiting_id, held_id],
                session_factory,
                providers,
                POLICY,
                dispatcher_for(redis, providers),
            )
        )
        await claim_waiting_for_a_lock(session_factory)
        async with session_factory.begin() as other:  # the other attempt puts its claim back
            await other.execute(
                text("UPDATE messages SET status = 'queued', attempts = 0 WHERE id = :id"),
                {"id": held_id},
            )
    result = await task

    assert twilio.recipients() == [number(401)]
    held = await load(session_factory, held_id)
    assert (held.status, held.attempts) == ("queued", 0)
    assert result.outcomes[held_id].status is None
    assert (await load(session_factory, waiting_id)).status == "sent"


@pytest.mark.parametrize("put_back_fails", [False, True])
async def test_claims_are_put_back_when_ending_the_left_over_messages_fails(
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    put_back_fails: bool,
) -> None:
    """The claim statement commits its claims; an expired message of the same job is ended by
    a transaction of its own. If that one fails, the claimed message is put back `queued` (a
    later job sends it) instead of staying `sending` with nobody sending it. If putting it back
    fails as well (the database is gone), the job fails with the first error, the one that says
    what happened, and the claim is left to reconciliation."""
    twilio = FakeTwilio()
    providers = twilio.providers()
    usual = await fresh(session_factory, world, number(411))
    expired = await fresh_expired(session_factory, world, number(412))

    async def left_over_fails(*_: Any) -> Any:
        raise RuntimeError("ending the left-over messages failed")

    async def release_fails(*_: Any, **__: Any) -> Any:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(transitions, "claim", left_over_fails)
    if put_back_fails:
        monkeypatch.setattr(transitions, "release", release_fails)
    with pytest.raises(RuntimeError, match="left-over"):
        await deliver_batch(
            [usual, expired], session_factory, providers, POLICY, dispatcher_for(redis, providers)
        )

    assert twilio.requests == []
    message = await load(session_factory, usual)
    if put_back_fails:
        assert (message.status, message.attempts) == ("sending", 1)  # for reconciliation
    else:
        assert (message.status, message.attempts) == ("queued", 0)
        assert await history(session_factory, usual) == ["sending", "queued"]
    assert (await load(session_factory, expired)).status == "queued"  # for a later job


async def test_unusual_messages_in_a_job_end_as_the_claim_decides(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    usual = await fresh(session_factory, world, number(1))
    expired = await fresh_expired(session_factory, world, number(2))
    backing_off = await fresh(
        session_factory, world, number(3), next_attempt_at=datetime.now(UTC) + timedelta(seconds=30)
    )

    result = await deliver_batch(
        [usual, expired, backing_off],
        session_factory,
        providers,
        POLICY,
        dispatcher_for(redis, providers),
    )

    assert twilio.recipients() == [number(1)]
    assert result.outcomes[usual].status is MessageStatus.SENT
    assert result.outcomes[expired].status is MessageStatus.EXPIRED
    assert (await load(session_factory, expired)).status == "expired"
    assert await history(session_factory, expired) == ["expired"]
    waits = result.outcomes[backing_off]
    assert waits.status is MessageStatus.QUEUED
    assert waits.retry_in is not None and 29 <= waits.retry_in <= 30
    assert (await load(session_factory, backing_off)).attempts == 0


async def test_messages_that_are_not_queued_are_not_sent_again(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    queued = await fresh(session_factory, world, number(1))
    sent = await fresh(
        session_factory, world, number(2), status="sent", attempts=1, provider_message_id="SMold"
    )
    in_flight = await fresh(session_factory, world, number(3), status="sending", attempts=1)
    delivered = await fresh(session_factory, world, number(4), status="delivered", attempts=1)
    missing = uuid.uuid4()

    result = await deliver_batch(
        [queued, sent, in_flight, delivered, missing],
        session_factory,
        providers,
        POLICY,
        dispatcher_for(redis, providers),
    )

    assert twilio.recipients() == [number(1)]
    assert result.outcomes[queued].status is MessageStatus.SENT
    for message_id in (sent, in_flight, delivered, missing):
        outcome = result.outcomes.get(message_id)
        assert outcome is None or outcome.status is None
    assert [
        (m.status, m.attempts, m.provider_message_id)
        for m in [await load(session_factory, i) for i in (sent, in_flight, delivered)]
    ] == [("sent", 1, "SMold"), ("sending", 1, None), ("delivered", 1, None)]


async def test_two_runs_of_the_same_batch_at_once_send_each_message_once(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio(delay=0.02)  # keeps both runs' provider calls overlapping
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 10)
    ids = list(batch)

    first, second = await asyncio.gather(
        deliver_batch(ids, session_factory, providers, POLICY, dispatcher_for(redis, providers)),
        deliver_batch(
            ids[::-1], session_factory, providers, POLICY, dispatcher_for(redis, providers)
        ),
    )

    assert Counter(twilio.recipients()) == Counter(batch.values())  # once each
    for message_id in ids:
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("sent", 1)
        assert await history(session_factory, message_id) == ["sending", "sent"]
        statuses = [
            outcome.status
            for outcome in (first.outcomes.get(message_id), second.outcomes.get(message_id))
            if outcome is not None
        ]
        assert statuses.count(MessageStatus.SENT) == 1


async def test_a_provider_error_fails_or_retries_only_its_own_message(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio(
        {
            number(101): twilio_error(400, 21211, "The 'To' number is not valid."),
            number(102): twilio_error(503, 20503, "Service Unavailable"),
        }
    )
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 5)
    by_number = {to: message_id for message_id, to in batch.items()}
    before = datetime.now(UTC)

    result = await deliver_batch(
        list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    assert sorted(twilio.recipients()) == sorted(batch.values())
    invalid, unavailable = by_number[number(101)], by_number[number(102)]
    assert result.outcomes[invalid] == Outcome(MessageStatus.FAILED)
    failed = await load(session_factory, invalid)
    assert (failed.status, failed.error_code, failed.attempts) == ("failed", "21211", 1)
    assert await history(session_factory, invalid) == ["sending", "failed"]
    retry = result.outcomes[unavailable]
    assert retry.status is MessageStatus.QUEUED
    assert retry.retry_in is not None and 0.5 <= retry.retry_in <= 1.0  # attempt 1: base delay
    requeued = await load(session_factory, unavailable)
    assert (requeued.status, requeued.error_code, requeued.attempts) == ("queued", "20503", 1)
    assert requeued.next_attempt_at >= before + timedelta(seconds=0.5)
    for to in (number(100), number(103), number(104)):
        assert result.outcomes[by_number[to]].status is MessageStatus.SENT
        assert (await load(session_factory, by_number[to])).status == "sent"


async def test_an_open_circuit_sends_nothing_and_the_messages_wait_unclaimed(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    await open_circuit(dispatcher, "twilio")
    batch = await fresh_batch(session_factory, world, 3)

    result = await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)

    assert twilio.requests == []
    for message_id in batch:
        outcome = result.outcomes[message_id]
        assert outcome.status is MessageStatus.QUEUED
        assert outcome.retry_in is not None and outcome.retry_in > 0
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("queued", 0)
        assert await history(session_factory, message_id) == []


async def test_when_the_open_period_is_over_exactly_one_message_goes_as_the_probe(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """The batch's own look at the circuit must not use up the probe: one of the batch's
    messages, on the one-by-one path, becomes it."""
    twilio = FakeTwilio(delay=0.2)  # the others look while the probe is still out
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers, circuit_open_seconds=0.2)
    await open_circuit(dispatcher, "twilio")
    batch = await fresh_batch(session_factory, world, 3)
    await asyncio.sleep(0.25)

    result = await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)

    assert len(twilio.requests) == 1
    statuses = Counter(outcome.status for outcome in result.outcomes.values())
    assert statuses == {MessageStatus.SENT: 1, MessageStatus.QUEUED: 2}
    assert all(
        outcome.retry_in is not None
        for outcome in result.outcomes.values()
        if outcome.status is MessageStatus.QUEUED
    )


async def test_a_batch_never_goes_ahead_of_messages_waiting_in_their_senders_line(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, rate_per_second=2.0)
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    sender = world.twilio_sender.id
    # One message just went; another holds a ticket for the next slot (in 0.5 s).
    await dispatcher.pacer.take(sender, uuid.uuid4(), 2.0)
    ticket = await dispatcher.pacer.take(sender, uuid.uuid4(), 2.0, consume=False)
    assert ticket.queued
    started = time.monotonic()
    batch = await fresh_batch(session_factory, world, 2)

    await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)

    assert len(twilio.times) == 2
    # Behind the ticket holder's slot (0.5 s): the slots at 1.0 s and 1.5 s.
    first, second = sorted(twilio.times)
    assert first - started >= 1.0 - 0.05
    assert second - first >= 0.5 - 0.1  # late by a busy event loop at most (never early)
    for message_id in batch:  # claimed once, when their turn came: never claimed and released
        assert await history(session_factory, message_id) == ["sending", "sent"]


async def test_a_slow_sender_sends_only_the_slots_within_the_inline_wait(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    rate = 1.0
    await set_sender(session_factory, world.twilio_sender, rate_per_second=rate)
    twilio = FakeTwilio()
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 5)

    result = await deliver_batch(
        list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    # Slots at 0, 1 and 2 s fit in the inline wait (2 s); the other two wait on the queue.
    assert len(twilio.requests) == 3
    gaps = [b - a for a, b in itertools.pairwise(sorted(twilio.times))]
    # A send never precedes its slot but may follow it late (a busy event loop): the next one,
    # on time, then follows by a little less than the interval. Unpaced, gaps would be ~0.
    assert min(gaps) >= 1 / rate - 0.1
    sent = [i for i, o in result.outcomes.items() if o.status is MessageStatus.SENT]
    waiting = [i for i, o in result.outcomes.items() if o.status is MessageStatus.QUEUED]
    assert (len(sent), len(waiting)) == (3, 2)
    assert sorted(twilio.recipients()) == sorted(batch[i] for i in sent)
    for message_id in waiting:
        retry_in = result.outcomes[message_id].retry_in
        assert retry_in is not None and retry_in >= 1.0
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("queued", 0)
        assert await history(session_factory, message_id) == []  # not even claimed


async def test_slots_taken_by_another_worker_during_the_claim_are_not_used_twice(
    session_factory: SessionFactory, world: World, redis: Redis, network_guard: NetworkGuard
) -> None:
    """While the claim waited for a recipient's lock, another worker took the sender's next
    two slots. The gate runs after the claim, so it sees them gone: one message goes at the
    slot left within the inline wait, the other two are put back unsent, without an attempt."""
    rate = 1.0
    await set_sender(session_factory, world.twilio_sender, rate_per_second=rate)
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    batch = await fresh_batch(session_factory, world, 3)

    async with session_factory.begin() as holder:  # e.g. a STOP being recorded for them
        await lock_recipients(holder, batch.values())
        started = time.monotonic()
        task = asyncio.create_task(
            deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)
        )
        await claim_waiting_for_a_lock(session_factory)
        with network_guard.paused():  # the test's lock, another worker's Redis call
            other = await dispatcher.pacer.reserve(world.twilio_sender.id, rate, 2, consume=True)
        assert other.count == 2  # the slots at 0 and 1 s
    result = await task

    assert max(Counter(twilio.recipients()).values()) == 1  # none sent twice
    times = sorted(twilio.times)
    assert len(times) == 1 and times[0] - started >= 2 / rate - 0.05  # after the other's slots
    histories = {i: await history(session_factory, i) for i in batch}
    sent = [i for i, steps in histories.items() if steps == ["sending", "sent"]]
    assert len(sent) == 1
    for message_id in batch.keys() - set(sent):
        assert histories[message_id] == []  # waiting is never an attempt
        async with session_factory() as session:
            note = await session.scalar(
                select(MessageEvent.detail)
                .where(MessageEvent.message_id == message_id, MessageEvent.status.is_(None))
                .order_by(MessageEvent.id.desc())
                .limit(1)
            )
        assert note is not None and note.startswith("not sent: the sender's pace; next turn in")
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("queued", 0)
        outcome = result.outcomes[message_id]
        assert outcome.status is MessageStatus.QUEUED and outcome.retry_in is not None


async def claim_waiting_for_a_lock(session_factory: SessionFactory) -> None:
    """Until some session waits for an advisory lock (the claim, on the recipients' locks)."""
    for _ in range(500):
        async with session_factory() as session:
            waiting = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the claim never waited for the recipients' locks")


async def test_cancelled_while_waiting_for_a_slot_releases_the_claim(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, rate_per_second=1.0)
    twilio = FakeTwilio()
    providers = twilio.providers()
    batch = await fresh_batch(session_factory, world, 3)

    task = asyncio.create_task(
        deliver_batch(
            list(batch), session_factory, providers, POLICY, dispatcher_for(redis, providers)
        )
    )
    while not twilio.requests:  # the first slot is now; the others are 1 s and 2 s away
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1.0)  # past the second slot: nothing left behind sends it

    (went,) = twilio.recipients()
    for message_id, to in batch.items():
        message = await load(session_factory, message_id)
        if to == went:  # accepted before the cancellation: recorded on the way out
            assert (message.status, message.attempts) == ("sent", 1)
            assert message.provider_message_id == twilio.sids[to]
            assert await history(session_factory, message_id) == ["sending", "sent"]
        else:
            assert (message.status, message.attempts) == ("queued", 0)
            assert await history(session_factory, message_id) == ["sending", "queued"]
            async with session_factory() as session:
                detail = await session.scalar(
                    select(MessageEvent.detail)
                    .where(MessageEvent.message_id == message_id)
                    .order_by(MessageEvent.id.desc())
                    .limit(1)
                )
            assert detail == "not sent: cancelled before the provider call"


async def test_with_redis_down_nothing_is_sent_and_every_message_waits(
    session_factory: SessionFactory, world: World
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1.0)
    batch = await fresh_batch(session_factory, world, 3)

    try:
        result = await deliver_batch(
            list(batch), session_factory, providers, POLICY, dispatcher_for(down, providers)
        )
    finally:
        await down.aclose()

    assert twilio.requests == []
    assert all(
        outcome.status is MessageStatus.QUEUED and outcome.retry_in is not None
        for outcome in result.outcomes.values()
    )
    assert set(result.outcomes) == set(batch)
    for message_id in batch:
        assert (await load(session_factory, message_id)).attempts == 0


async def test_the_batchs_successes_reset_the_providers_failure_count(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers, circuit_failure_threshold=3)
    fault = ProviderError(ErrorKind.RETRYABLE, "HTTP 500", provider_fault=True)
    for _ in range(2):
        await dispatcher.health.record("twilio", fault)
    batch = await fresh_batch(session_factory, world, 2)

    await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)
    await dispatcher.health.record("twilio", fault)

    # Two failures, then successes, then one failure: not three in a row.
    assert (await dispatcher.health.check("twilio")).state is CircuitState.CLOSED


def every_fifth_fails() -> Answer:
    """Twilio answering every 5th CreateMessage with a 500 (a 20% error rate), the rest 201."""
    counter = itertools.count(1)

    def answer(request: httpx.Request) -> httpx.Response:
        if next(counter) % 5 == 0:
            return twilio_error(500, 20500, "Internal Server Error")(request)
        form = parse_qs(request.content.decode())
        return httpx.Response(
            201,
            json={
                "sid": "SM" + uuid.uuid4().hex,
                "account_sid": TWILIO_SID,
                "status": "queued",
                "to": form["To"][0],
                "from": form["From"][0],
                "body": form["Body"][0],
            },
        )

    return answer


async def test_a_provider_failing_one_request_in_five_never_opens_the_breaker(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """Each success is told to the breaker as it arrives, so it resets the failures before it:
    20% of 500s spread among successes are not 5 failures in a row (default settings)."""
    answer = every_fifth_fails()
    batches = [await fresh_batch(session_factory, world, 50, first=1000 * n) for n in (1, 2, 3)]
    twilio = FakeTwilio(dict.fromkeys(itertools.chain(*(b.values() for b in batches)), answer))
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)

    for batch in batches:
        result = await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)
        health = await dispatcher.health.check("twilio", may_probe=False)
        assert health.state is CircuitState.CLOSED
        statuses = Counter(outcome.status for outcome in result.outcomes.values())
        assert statuses == {MessageStatus.SENT: 40, MessageStatus.QUEUED: 10}

    assert len(twilio.requests) == 150  # nothing held back by an open circuit


class SkewedClock(datetime):
    """The worker's clock an hour ahead of the database's."""

    @classmethod
    def now(cls, tz: Any = None) -> SkewedClock:
        return super().now(tz) + timedelta(hours=1)


@pytest.mark.parametrize("path", ["batch", "single"])
async def test_claimed_at_is_the_databases_clock_not_the_workers(
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    message_id = await fresh(session_factory, world, number(1))
    monkeypatch.setattr("app.delivery.pipeline.datetime", SkewedClock)
    dispatcher = dispatcher_for(redis, providers)

    if path == "batch":
        await deliver_batch([message_id], session_factory, providers, POLICY, dispatcher)
    else:
        await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    async with session_factory() as session:
        claimed_at = await session.scalar(
            select(Message.claimed_at).where(Message.id == message_id)
        )
        claim_event_at = await session.scalar(
            select(MessageEvent.created_at).where(
                MessageEvent.message_id == message_id, MessageEvent.status == "sending"
            )
        )
    assert (await load(session_factory, message_id)).status == "sent"
    # Both written by the claim's transaction, from its `now()`.
    assert claimed_at is not None and claimed_at == claim_event_at


@pytest.fixture
def redis_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Redis commands sent (any client of this process), in order."""
    sent: list[str] = []
    real: Callable[..., Awaitable[Any]] = Redis.execute_command

    async def counting(self: Redis, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await real(self, *args, **options)

    monkeypatch.setattr(Redis, "execute_command", counting)
    return sent


@pytest.mark.parametrize("path", ["batch", "single"])
async def test_what_one_message_costs_in_statements_and_redis_commands(
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    redis_commands: list[str],
    path: str,
) -> None:
    """A one-message delivery's database statements and Redis commands (without arq's own):
    a ceiling at today's figures, so a change that adds round trips shows here."""
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    message_id = await fresh(session_factory, world, number(1))
    redis_commands.clear()
    before = DB_STATEMENTS._value.get()

    if path == "batch":
        await deliver_batch([message_id], session_factory, providers, POLICY, dispatcher)
    else:
        await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    statements = DB_STATEMENTS._value.get() - before
    print(f"{path}: {statements:.0f} statements, Redis {redis_commands}")  # noqa: T201
    assert (await load(session_factory, message_id)).status == "sent"
    # Measured: 2 statements, each committed on its own (no BEGIN or COMMIT): the claim (the
    # recipients' locks, then opt-out + UPDATE + history, in the connection's claim function),
    # the record (the client having no endpoint to tell); and 2 EVALSHA (the gate: circuit and
    # the sender's run of slots in one script; breaker success), either way: one road. The
    # claim function's creation, on a connection's first claim, is not counted here.
    assert statements <= 2
    assert len(redis_commands) <= 2


async def test_a_one_message_job_and_a_batch_claim_through_the_same_function(
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One claim for 1..N messages (app.delivery.transitions): the rules cannot drift apart."""
    claims: list[int] = []
    real = db_session.raw_statement  # what transitions calls

    async def spy(session_factory: Any, sql: str, *args: Any, **options: Any) -> list[Any]:
        if sql == transitions._CLAIM_NOW:
            claims.append(len(args[0]))
        return await real(session_factory, sql, *args, **options)

    monkeypatch.setattr(transitions, "raw_statement", spy)
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    single = await fresh(session_factory, world, number(1))
    batch = await fresh_batch(session_factory, world, 3, first=10)

    await deliver_message(single, session_factory, providers, POLICY, dispatcher)
    await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher)

    assert claims == [1, 3]
    assert len(twilio.requests) == 4


async def test_a_job_cut_short_before_its_calls_puts_its_claims_back(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """A gate stalled (Redis slow) past the job's budget: nothing reached the provider, so
    nothing may stay `sending` for reconciliation to resend."""
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    batch = await fresh_batch(session_factory, world, 2)

    async def stalled(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    dispatcher.gate = stalled  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await deliver_batch(list(batch), session_factory, providers, POLICY, dispatcher, budget=0.3)

    assert twilio.requests == []
    for message_id in batch:
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("queued", 0)


async def test_an_acceptance_is_recorded_even_when_the_job_is_cut_short_right_after_it(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    message_id = await fresh(session_factory, world, number(1))

    async def stalled(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(30)  # telling the breaker hangs

    dispatcher.record = stalled  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await deliver_batch(
            [message_id], session_factory, providers, POLICY, dispatcher, budget=0.5
        )

    assert len(twilio.requests) == 1
    message = await load(session_factory, message_id)
    assert message.status == "sent" and message.provider_message_id == twilio.sids[number(1)]


async def test_a_job_records_acceptances_with_events_only_for_clients_with_an_endpoint(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    """The record commits the acceptances of clients without an endpoint in one statement and
    those of clients with one in a transaction with their `message.sent` events: in one job,
    each message gets exactly the events its client asked for, and both are `sent`."""
    told = await fresh(session_factory, world, number(1))
    quiet = await fresh(session_factory, world, number(2))
    async with session_factory.begin() as session:
        other = await session.scalar(text("SELECT id FROM clients WHERE name = 'other-shop'"))
        await session.execute(
            text("UPDATE messages SET client_id = :other WHERE id = :id"),
            {"other": other, "id": quiet},
        )
        session.add(
            WebhookEndpoint(
                client_id=world.client_id, url="https://hooks.example.com/sms", is_default=True
            )
        )
    twilio = FakeTwilio()
    providers = twilio.providers()

    result = await deliver_batch(
        [told, quiet], session_factory, providers, POLICY, dispatcher_for(redis, providers)
    )

    assert {result.outcomes[told].status, result.outcomes[quiet].status} == {MessageStatus.SENT}
    async with session_factory() as session:
        events = (
            await session.execute(
                text("SELECT message_id, type FROM webhook_events ORDER BY created_at")
            )
        ).all()
    assert [(row.message_id, row.type) for row in events] == [(told, "message.sent")]
    assert len(result.events) == 1
    for message_id in (told, quiet):
        assert await history(session_factory, message_id) == ["sending", "sent"]
