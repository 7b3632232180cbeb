"""DeliveryBatcher and push_ready: the messages of concurrent requests reach the delivery feed's
list in Redis together, in acceptance order; a Redis outage never raises."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.worker.queue import (
    DeliveryBatcher,
    Queue,
    close_queue,
    create_queue,
    push_ready,
)
from tests.conftest import TEST_REDIS_URL
from tests.queueing import queued_message_ids, ready_ids, ready_length

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


def ids(count: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(count)]


def as_strings(message_ids: list[uuid.UUID]) -> list[str]:
    return [str(message_id) for message_id in message_ids]


@pytest.fixture
async def queue(redis: Redis) -> AsyncIterator[Queue]:
    queue = create_queue(TEST_REDIS_URL)
    yield queue
    await close_queue(queue)


class CountingQueue:
    """Counts the pushes a batcher makes, passing them on to the real queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.pushes = 0

    def rpush(self, key: str, *values: str) -> object:
        self.pushes += 1
        return self.queue.rpush(key, *values)


async def test_concurrent_requests_share_one_push(queue: Queue, redis: Redis) -> None:
    counting = CountingQueue(queue)
    batcher = DeliveryBatcher(counting)  # type: ignore[arg-type]
    requests = [ids(2), ids(1), ids(3)]

    await asyncio.gather(*(batcher.enqueue(message_ids) for message_ids in requests))

    # Each request returned only once its messages were on the list, all in one command.
    assert counting.pushes == 1
    assert await ready_ids(redis) == as_strings([i for r in requests for i in r])


async def test_requests_within_the_linger_join_the_waiting_push(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue, linger=0.1)
    early, late = ids(2), ids(2)

    first = asyncio.create_task(batcher.enqueue(early))
    await asyncio.sleep(0.03)
    assert await ready_length(redis) == 0  # still lingering for others
    await asyncio.gather(first, batcher.enqueue(late))

    assert await ready_ids(redis) == as_strings(early + late)


async def test_a_request_after_the_flush_is_pushed_after_it(queue: Queue, redis: Redis) -> None:
    batcher = DeliveryBatcher(queue)
    first, second = ids(2), ids(2)

    await batcher.enqueue(first)
    await batcher.enqueue(second)

    assert await ready_ids(redis) == as_strings(first + second)


async def test_nothing_to_enqueue_queues_nothing(queue: Queue, redis: Redis) -> None:
    await DeliveryBatcher(queue).enqueue([])
    assert await push_ready(queue, []) == 0

    assert await ready_length(redis) == 0 and await redis.zcard("arq:queue") == 0


async def test_a_large_batch_is_one_push(queue: Queue, redis: Redis) -> None:
    message_ids = ids(1000)

    assert await push_ready(queue, message_ids) == 1000

    assert await ready_ids(redis) == as_strings(message_ids)
    assert sorted(await queued_message_ids(redis)) == sorted(as_strings(message_ids))


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
        queued = await push_ready(down, ids(3))
        batcher = DeliveryBatcher(down)
        await asyncio.gather(batcher.enqueue(ids(2)), batcher.enqueue(ids(1)))
        await batcher.enqueue(ids(1))  # and the batcher is not stuck afterwards
        elapsed = time.monotonic() - started
    finally:
        await close_queue(down)

    assert queued == 0
    assert elapsed < 5.0  # short timeouts: an accept never hangs on Redis
    assert await ready_length(redis) == 0 and await redis.zcard("arq:queue") == 0
