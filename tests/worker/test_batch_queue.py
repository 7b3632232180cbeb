"""DeliveryBatcher and enqueue_batches: the messages of concurrent requests share batch jobs on
the real arq queue in Redis; large batches are split; a Redis outage never raises."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from arq.jobs import deserialize_job
from redis.asyncio import Redis

from app.worker.queue import (
    BATCH_JOB_MAX,
    DELIVER_BATCH_JOB,
    DeliveryBatcher,
    Queue,
    close_queue,
    create_queue,
    enqueue_batches,
)
from tests.conftest import TEST_REDIS_URL
from tests.queueing import queued_message_ids

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


async def queued_jobs(redis: Redis) -> list[tuple[str, list[str]]]:
    """(function, message ids) of every job waiting on the delivery queue."""
    jobs = []
    for job_id in await redis.zrange("arq:queue", 0, -1):
        data = await redis.get(f"arq:job:{job_id.decode()}")
        assert data is not None
        job = deserialize_job(data)
        jobs.append((job.function, list(job.args[0])))
    return jobs


def ids(count: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(count)]


def as_strings(message_ids: list[uuid.UUID]) -> list[str]:
    return [str(message_id) for message_id in message_ids]


@pytest.fixture
async def queue(redis: Redis) -> AsyncIterator[Queue]:
    queue = create_queue(TEST_REDIS_URL)
    yield queue
    await close_queue(queue)


async def test_concurrent_requests_share_one_job(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue)
    requests = [ids(2), ids(1), ids(3)]

    await asyncio.gather(*(batcher.enqueue(message_ids) for message_ids in requests))

    # Each request returned only once its messages were on the queue.
    jobs = await queued_jobs(redis)
    assert [function for function, _ in jobs] == [DELIVER_BATCH_JOB]
    assert sorted(jobs[0][1]) == sorted(as_strings([i for r in requests for i in r]))


async def test_requests_within_the_linger_join_the_waiting_job(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue, linger=0.1)
    early, late = ids(2), ids(2)

    first = asyncio.create_task(batcher.enqueue(early))
    await asyncio.sleep(0.03)
    assert await redis.zcard("arq:queue") == 0  # still lingering for others
    await asyncio.gather(first, batcher.enqueue(late))

    assert await redis.zcard("arq:queue") == 1
    assert sorted(await queued_message_ids(redis)) == sorted(as_strings(early + late))


async def test_a_request_after_the_flush_gets_a_job_of_its_own(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue)
    first, second = ids(2), ids(2)

    await batcher.enqueue(first)
    await batcher.enqueue(second)

    assert sorted(job[1] for job in await queued_jobs(redis)) == sorted(
        [as_strings(first), as_strings(second)]
    )


async def test_nothing_to_enqueue_queues_nothing(queue: Queue, redis: Redis) -> None:
    await DeliveryBatcher(queue).enqueue([])
    assert await enqueue_batches(queue, []) == 0

    assert await redis.zcard("arq:queue") == 0


async def test_more_than_a_jobs_worth_is_split(queue: Queue, redis: Redis) -> None:
    message_ids = ids(2 * BATCH_JOB_MAX + 7)

    queued = await enqueue_batches(queue, message_ids)

    assert queued == len(message_ids)
    jobs = await queued_jobs(redis)
    assert {function for function, _ in jobs} == {DELIVER_BATCH_JOB}
    assert sorted(len(carried) for _, carried in jobs) == [7, BATCH_JOB_MAX, BATCH_JOB_MAX]
    assert sorted(await queued_message_ids(redis)) == sorted(as_strings(message_ids))


async def test_the_batcher_splits_what_concurrent_requests_gathered(
    queue: Queue, redis: Redis
) -> None:
    batcher = DeliveryBatcher(queue)
    requests = [ids(BATCH_JOB_MAX - 10) for _ in range(3)]

    await asyncio.gather(*(batcher.enqueue(message_ids) for message_ids in requests))

    jobs = await queued_jobs(redis)
    assert all(len(carried) <= BATCH_JOB_MAX for _, carried in jobs)
    assert len(jobs) == 3  # 120 messages: 50 + 50 + 20
    assert sorted(await queued_message_ids(redis)) == sorted(
        as_strings([i for r in requests for i in r])
    )


async def test_a_request_that_goes_away_does_not_cancel_the_others_enqueue(
    queue: Queue, redis: Redis
) -> None:
    batcher = DeliveryBatcher(queue, linger=0.05)
    leaving, staying = ids(1), ids(1)

    gone = asyncio.create_task(batcher.enqueue(leaving))
    await asyncio.sleep(0)
    stays = asyncio.create_task(batcher.enqueue(staying))
    await asyncio.sleep(0.01)
    gone.cancel()
    await stays

    assert sorted(await queued_message_ids(redis)) == sorted(as_strings(leaving + staying))


async def test_close_waits_for_the_flush_in_progress(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue, linger=0.05)
    message_ids = ids(2)

    request = asyncio.create_task(batcher.enqueue(message_ids))
    await asyncio.sleep(0.01)
    request.cancel()  # the client went away; its messages are stored and must still be queued
    await batcher.close()

    assert sorted(await queued_message_ids(redis)) == sorted(as_strings(message_ids))


async def test_with_redis_down_enqueueing_returns_without_raising(redis: Redis) -> None:
    down = create_queue(DOWN)
    try:
        started = time.monotonic()
        queued = await enqueue_batches(down, ids(3))
        batcher = DeliveryBatcher(down)
        await asyncio.gather(batcher.enqueue(ids(2)), batcher.enqueue(ids(1)))
        await batcher.enqueue(ids(1))  # and the batcher is not stuck afterwards
        elapsed = time.monotonic() - started
    finally:
        await close_queue(down)

    assert queued == 0
    assert elapsed < 5.0  # short timeouts: an accept never hangs on Redis
    assert await redis.zcard("arq:queue") == 0
