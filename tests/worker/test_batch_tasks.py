"""The worker side of batch delivery: InFlightLimit, the `deliver_batch` task shell, and the
whole path API -> batch job -> a real arq worker (burst) -> provider faked at the HTTP boundary."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from app.db.session import SessionFactory
from app.delivery.dispatch import Dispatcher
from app.delivery.pipeline import deliver
from app.providers.base import Provider
from app.worker import tasks
from app.worker.queue import DELIVER_JOB, close_queue, create_queue
from app.worker.tasks import InFlightLimit
from tests.api.test_batch import item, post_batch, results
from tests.conftest import TEST_REDIS_URL, World, make_settings
from tests.domain.test_batch_delivery import FakeTwilio, dispatcher_for, fresh_batch
from tests.domain.test_delivery import POLICY, RecordingProvider, history, load, twilio_created
from tests.domain.test_dispatch import open_circuit, set_sender
from tests.queueing import queued_jobs, ready_ids
from tests.test_end_to_end import run_worker

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard


async def test_take_gives_what_is_free_at_least_one_at_most_wanted() -> None:
    limit = InFlightLimit(3)

    assert await limit.take(5) == 3  # all that is free, not what was wanted
    await limit.give(3)
    assert await limit.take(2) == 2  # no more than wanted
    assert await limit.take(4) == 1  # the rest


async def test_take_waits_while_nothing_is_free_and_give_wakes_it() -> None:
    limit = InFlightLimit(2)
    await limit.take(2)

    waiting = asyncio.create_task(limit.take(4))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await limit.give(1)

    assert await asyncio.wait_for(waiting, 1.0) == 1


async def test_give_wakes_every_waiter_that_fits() -> None:
    limit = InFlightLimit(1)
    await limit.take(1)
    waiters = [asyncio.create_task(limit.take(1)) for _ in range(3)]
    await asyncio.sleep(0.01)

    await limit.give(2)
    await asyncio.sleep(0.01)

    assert sorted(w.result() for w in waiters if w.done()) == [1, 1]
    (still,) = [w for w in waiters if not w.done()]
    await limit.give(1)
    assert await asyncio.wait_for(still, 1.0) == 1


@pytest.fixture
async def worker_ctx(
    session_factory: SessionFactory, redis: Redis
) -> AsyncIterator[dict[str, Any]]:
    """What the worker's startup puts in ctx, on the test database and Redis (providers and
    the dispatcher are set by each test)."""
    queue = create_queue(TEST_REDIS_URL)
    yield {
        "session_factory": session_factory,
        "delivery_sessions": session_factory,
        "redis": queue,
        "retry_policy": POLICY,
    }
    await close_queue(queue)


def equip(
    ctx: dict[str, Any], providers: dict[str, Provider], dispatcher: Dispatcher, limit: int
) -> None:
    ctx |= {"providers": providers, "dispatcher": dispatcher, "in_flight": InFlightLimit(limit)}


async def test_the_task_delivers_in_chunks_of_what_the_worker_has_room_for(
    worker_ctx: dict[str, Any], session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio(delay=0.05)
    providers = twilio.providers()
    equip(worker_ctx, providers, dispatcher_for(redis, providers), limit=2)
    batch = await fresh_batch(session_factory, world, 5)

    sent = await tasks.deliver_batch(worker_ctx, [str(i) for i in batch])

    assert sent == 5
    assert sorted(twilio.recipients()) == sorted(batch.values())
    assert twilio.max_in_flight == 2  # never more than the limit at once
    assert await worker_ctx["in_flight"].take(10) == 2  # everything was given back
    assert await redis.zcard("arq:queue") == 0 and await ready_ids(redis) == []


async def test_messages_that_must_wait_get_deferred_jobs_of_their_own(
    worker_ctx: dict[str, Any], session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    twilio = FakeTwilio()
    providers = twilio.providers()
    dispatcher = dispatcher_for(redis, providers)
    equip(worker_ctx, providers, dispatcher, limit=10)
    await open_circuit(dispatcher, "twilio")
    batch = await fresh_batch(session_factory, world, 3)
    now_ms = time.time() * 1000

    sent = await tasks.deliver_batch(worker_ctx, [str(i) for i in batch])

    assert sent == 0 and twilio.requests == []
    jobs = await redis.zrange("arq:queue", 0, -1, withscores=True)
    assert sorted(job_id.decode() for job_id, _ in jobs) == sorted(f"deliver:{i}" for i in batch)
    assert all(score > now_ms for _, score in jobs)  # deferred, not due now
    assert {function for function, _ in await queued_jobs(redis)} == {DELIVER_JOB}


async def test_a_full_worker_puts_the_batch_back_on_the_feed_unclaimed(
    worker_ctx: dict[str, Any],
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "BATCH_WAIT_SECONDS", 0.2)
    twilio = FakeTwilio()
    providers = twilio.providers()
    equip(worker_ctx, providers, dispatcher_for(redis, providers), limit=1)
    await worker_ctx["in_flight"].take(1)  # busy with another job's message
    batch = await fresh_batch(session_factory, world, 3)

    started = time.monotonic()
    sent = await tasks.deliver_batch(worker_ctx, [str(i) for i in batch])

    assert sent == 0 and twilio.requests == []
    assert 0.2 <= time.monotonic() - started < 1.0
    assert await queued_jobs(redis) == []
    assert sorted(await ready_ids(redis)) == sorted(str(i) for i in batch)
    for message_id in batch:
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("queued", 0)


async def test_a_batch_accepted_by_the_api_is_delivered_by_a_worker_each_message_once(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    numbers = [f"+1415555{n:04d}" for n in range(300, 312)]
    response = await post_batch(api, world, [item(to) for to in numbers])
    accepted = [uuid.UUID(entry["message"]["id"]) for entry in results(response)]
    assert await ready_ids(redis) == [str(i) for i in accepted]  # on the feed, in order
    provider = RecordingProvider(twilio_created)

    await run_worker(provider)

    recipients = [parse_qs(r.content.decode())["To"][0] for r in provider.requests]
    assert Counter(recipients) == Counter(numbers)  # each submitted once
    for message_id in accepted:
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("sent", 1)
        assert await history(session_factory, message_id) == ["queued", "sending", "sent"]
    assert await redis.zcard("arq:queue") == 0 and await ready_ids(redis) == []


async def test_a_slow_senders_batch_is_spread_over_jobs_but_never_faster_than_its_rate(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    rate = 2.0
    await set_sender(session_factory, world.twilio_sender, rate_per_second=rate)
    times: list[float] = []

    def timed(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return twilio_created(request)

    numbers = [f"+1415555{n:04d}" for n in range(300, 307)]
    response = await post_batch(api, world, [item(to) for to in numbers])
    accepted = [uuid.UUID(entry["message"]["id"]) for entry in results(response)]
    provider = RecordingProvider(timed)

    await run_worker(provider)

    recipients = [parse_qs(r.content.decode())["To"][0] for r in provider.requests]
    assert Counter(recipients) == Counter(numbers)
    gaps = [b - a for a, b in itertools.pairwise(sorted(times))]
    # A send never precedes its slot, but may follow it late (a busy event loop): the next one,
    # on time, then follows it by a little less than the interval. Unpaced, gaps would be ~0.
    assert min(gaps) >= 1 / rate - 0.1
    for message_id in accepted:
        message = await load(session_factory, message_id)
        assert (message.status, message.attempts) == ("sent", 1)


async def test_the_workers_pool_holds_a_connection_per_message_in_flight_and_no_overflow(
    database: str, redis: Redis
) -> None:
    """Overflow connections are closed when returned (about 2 ms of PostgreSQL CPU each to
    open again): the worker's pool is as large as its concurrency (up to DB_POOL_SIZE) and has
    none."""
    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(worker_concurrency=7, db_pool_size=32),
        "redis": queue,
        "http": httpx.AsyncClient(),
    }
    await tasks.startup(ctx)
    try:
        pool = ctx["engine"].pool
        assert (pool.size(), pool._max_overflow) == (min(7, 2 * tasks.WORKER_POOL_SPARE), 0)
        delivery = ctx["delivery_engine"].pool
        assert (delivery.size(), delivery._max_overflow) == (7, 0)
        # The delivery road's sessions keep one plan per statement; the sweeps' do not (their
        # queries name values that partial indexes are built on).
        async with ctx["delivery_sessions"]() as session:
            assert await session.scalar(text("SHOW plan_cache_mode")) == "force_generic_plan"
        async with ctx["session_factory"]() as session:
            assert await session.scalar(text("SHOW plan_cache_mode")) == "auto"
    finally:
        await tasks.shutdown(ctx)
        await close_queue(queue)
    assert tasks.delivery_pool_size(make_settings(worker_concurrency=100, db_pool_size=20)) == 20
    assert tasks.worker_pool_size(make_settings(worker_concurrency=2, db_pool_size=20)) == 2


async def test_a_chunk_that_fails_does_not_cut_the_others_short(
    worker_ctx: dict[str, Any],
    session_factory: SessionFactory,
    world: World,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One chunk past its budget (or meeting a database error) has put back or recorded its
    own messages; the chunks beside it go on and are counted, and the room is given back."""
    twilio = FakeTwilio(delay=0.05)
    providers = twilio.providers()
    equip(worker_ctx, providers, dispatcher_for(redis, providers), limit=2)
    batch = await fresh_batch(session_factory, world, 4)
    real = deliver
    chunks: list[int] = []

    async def first_chunk_fails(ids: list[uuid.UUID], *args: Any, **kwargs: Any) -> Any:
        chunks.append(len(ids))
        if len(chunks) == 1:
            raise TimeoutError("past its budget")
        return await real(ids, *args, **kwargs)

    monkeypatch.setattr(tasks, "deliver_messages", first_chunk_fails)
    sent = await tasks.deliver_batch(worker_ctx, [str(i) for i in batch])

    assert chunks == [2, 2] and sent == 2
    assert len(twilio.requests) == 2
    assert await worker_ctx["in_flight"].take(10) == 2  # all the room was given back
