"""The delivery feed: newly accepted messages reach a worker the moment they are queued.

The API pushes the ids of the messages it accepted onto one Redis list after its commit
(`app.worker.queue.push_ready`); every worker keeps one blocking pop waiting on that list, so a
message is picked up as soon as it is queued, by exactly one worker, with no polling and none of
a job queue's bookkeeping (an arq job costs about twenty Redis commands to enqueue, start and
finish; a message through the feed costs one push and its share of one pop, a BLMPOP that takes
what waits or else blocks for what comes).

The list is only a doorbell: PostgreSQL holds the message as `queued`, and the sweep
re-enqueues any queued message that nobody claimed within `SWEEP_GRACE_SECONDS` (a worker killed
after its pop, Redis restarted without persistence). The delivery of what was popped is the one
delivery road every job takes (`app.worker.tasks`); retries and waits for a later time go on the
arq queue as deferred jobs, as before.

A worker pops only what it has room for (`InFlightLimit`), so a busy worker leaves the list to
the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from app.kernel.outages import REDIS, Outage, unavailable_dependency
from app.worker.queue import READY_KEY

log = logging.getLogger(__name__)

# How long one blocking pop waits before it looks again (and notices a stop).
POP_WAIT_SECONDS: Final = 1
# After a Redis error, wait this long before popping again (Redis restarting, a dropped link).
ERROR_BACKOFF_SECONDS: Final = 0.5
# The most messages one pop hands to one delivery.
CHUNK_MAX: Final = 50
# The most deliveries a feed runs at once. Under load, what arrives while they run waits on the
# list and the next pop takes it together, so a job's fixed costs (its claim, its gate) are shared
# by more messages the busier the worker is; when idle, a message still goes at once.
RUNNING_MAX: Final = 4


class Room(Protocol):
    """How many more messages this worker may take on now (`InFlightLimit`)."""

    async def wait_free(self) -> int:
        """Wait until something is free; how much (nothing is taken)."""
        ...


Deliver = Callable[[list[str]], Coroutine[Any, Any, object]]


class DeliveryFeed:
    """One worker's consumer of the ready list: pop what there is room for, deliver it."""

    def __init__(
        self,
        redis: Redis,
        deliver: Deliver,
        room: Room,
        *,
        key: str = READY_KEY,
        pop_wait: int = POP_WAIT_SECONDS,
        chunk_max: int = CHUNK_MAX,
        running_max: int = RUNNING_MAX,
        db_outage: Outage | None = None,
    ) -> None:
        self._redis = redis
        self._db_outage = db_outage
        self._deliver = deliver
        self._room = room
        self._key = key
        self._pop_wait = pop_wait
        self._chunk_max = chunk_max
        self._running_max = running_max
        self._slot_free = asyncio.Event()
        self._closed_at = 0.0
        self._stopping = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[object]] = set()
        # Whether Redis takes BLMPOP: unknown until the first pop; refused then, never asked again.
        self._blmpop: bool | None = None

    def start(self) -> None:
        """Start popping in the background."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="delivery-feed")

    @property
    def busy(self) -> int:
        """Deliveries started by this feed that have not finished."""
        return len(self._running)

    def close(self) -> None:
        """Stop popping now (a stop signal arrived); `stop` later waits for what is under way,
        its `wait` counted from now."""
        if not self._stopping.is_set():
            self._closed_at = asyncio.get_running_loop().time()
            self._stopping.set()

    async def stop(self, wait: float) -> None:
        """Stop popping (a pop in progress, at most `pop_wait` long, is still delivered), and give
        the deliveries under way until `wait` seconds after the call before cancelling them: a
        cancelled delivery releases a claim whose provider call had not started and records an
        interrupted one as unknown."""
        self.close()
        deadline = self._closed_at + wait
        if self._loop is not None:
            await self._loop
            self._loop = None
        if not self._running:
            return
        left = max(deadline - asyncio.get_running_loop().time(), 0.0)
        _, pending = await asyncio.wait(set(self._running), timeout=left)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            if await self._unless_stopped(self._job_slot()) is None:
                return
            free = await self._unless_stopped(self._room.wait_free())
            if free is None:
                return
            try:
                message_ids = await self._pop(min(free, self._chunk_max))
            except (RedisError, OSError) as error:
                REDIS.failed(error, action="delivery feed pop")
                await self._pause(ERROR_BACKOFF_SECONDS)
                continue
            except Exception:  # a bug must not stop the feed for good: the sweep is slow
                log.exception("delivery feed: pop failed")
                await self._pause(ERROR_BACKOFF_SECONDS)
                continue
            REDIS.recovered()
            if message_ids:
                self._spawn(message_ids)

    async def _pop(self, count: int) -> list[str]:
        """Up to `count` ids: what is waiting, or else what arrives first (blocking up to
        `pop_wait`). One command (BLMPOP, Redis 7); where the first BLMPOP is refused as a
        command (a Redis before 7, such as the embedded one of `smsgate dev`; an ACL without
        it), one while there is a backlog and two when the list ran dry."""
        if self._blmpop is not False:
            try:
                key = cast(list[str], self._key)  # (redis-py types each key name as a list)
                blmpop = self._redis.blmpop(self._pop_wait, 1, key, direction="LEFT", count=count)
                popped = await cast(Awaitable[list[Any] | None], blmpop)
            except ResponseError as error:
                if self._blmpop or not _refuses_the_command(error):
                    raise  # it worked before, or another error: a Redis error, as any other
                log.warning("delivery feed: no BLMPOP (%s); popping with LPOP and BLPOP", error)
                self._blmpop = False
            else:
                self._blmpop = True
                return [_text(item) for item in popped[1]] if popped else []
        # redis-py types its commands for both its clients; this one is asyncio's.
        waiting = await cast(Awaitable[list[bytes] | None], self._redis.lpop(self._key, count))
        if waiting:
            return [_text(item) for item in waiting]
        blpop = self._redis.blpop([self._key], timeout=self._pop_wait)
        popped_one = await cast(Awaitable[tuple[bytes, bytes] | None], blpop)
        return [_text(popped_one[1])] if popped_one else []

    def _spawn(self, message_ids: list[str]) -> None:
        task: asyncio.Task[object] = asyncio.create_task(self._deliver(message_ids))
        self._running.add(task)
        task.add_done_callback(self._finished)

    async def _job_slot(self) -> int:
        """Wait until fewer than `running_max` deliveries run; how many do."""
        while len(self._running) >= self._running_max:
            self._slot_free.clear()
            await self._slot_free.wait()
        return len(self._running)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._running.discard(task)
        self._slot_free.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            # The messages stay `queued` or `sending` in PostgreSQL: the sweep and reconciliation
            # pick them up. Logged here because nothing awaits the task.
            if self._db_outage is not None and unavailable_dependency(error) == "postgresql":
                self._db_outage.failed(error, action="delivery from the feed")
            else:
                log.error("delivery from the feed failed", exc_info=error)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _unless_stopped(self, waiting: Awaitable[int]) -> int | None:
        """What `waiting` gives, or None if the feed is stopped first (a full worker waits for
        room, and must still stop promptly)."""
        wanted = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({wanted, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not wanted.done():
                wanted.cancel()
        return wanted.result() if wanted.done() and not wanted.cancelled() else None


def _refuses_the_command(error: ResponseError) -> bool:
    """Whether Redis refused the command itself (a Redis before 7, an ACL without it, a proxy
    that does not pass it), not what it was asked (READONLY during a failover, say)."""
    said = str(error).lower()
    return isinstance(error, NoPermissionError) or any(
        words in said for words in ("unknown command", "unsupported")
    )


def _text(item: bytes | str) -> str:
    return item.decode() if isinstance(item, bytes) else item
