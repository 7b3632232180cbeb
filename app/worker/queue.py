"""Putting work on the arq queues: SMS deliveries and, on a queue of their own, event deliveries.

The worker package's one door for the rest of the app: the API and the sweeps enqueue through
this module; only the worker package imports arq.

Events have a queue (`arq:events`) and a worker of their own (`smsgate worker --queue events`),
so a slow or dead client endpoint can never hold up an SMS: the SMS worker never runs an event
job, whatever happens to receivers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from typing import Final, cast

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

from app.events.outbox import EventJob
from app.kernel.outages import REDIS

log = logging.getLogger(__name__)

DELIVER_JOB = "deliver"
DELIVER_BATCH_JOB = "deliver_batch"
# How long the API lets the messages of concurrent requests gather before queueing them: none
# beyond the event loop's current turn (one push is a single cheap command; a message's time to
# the provider is what this would add to).
BATCH_LINGER_SECONDS: Final = 0.0
# How long an accept waits for that push: a Redis that hangs (rather than refuses) must not
# hold every 202 for the socket timeout; the sweep queues what was not pushed.
PUSH_TIMEOUT_SECONDS: Final = 0.25
FAKE_REPORT_JOB = "fake_status_report"
# The list of newly accepted messages that every worker's delivery feed pops (app.worker.feed).
READY_KEY: Final = "smsgate:deliver:ready"

Queue = ArqRedis


def health_check_keys() -> list[str]:
    """The Redis keys where the SMS and the events worker record their health (arq's naming)."""
    from arq.constants import default_queue_name, health_check_key_suffix

    return [f"{queue}{health_check_key_suffix}" for queue in (default_queue_name, EVENTS_QUEUE)]


def create_queue(redis_url: str) -> Queue:
    """A queue client that connects lazily, so the API starts (and accepts) while Redis is down.

    Short timeouts: when Redis is unreachable an accept must not hang; the sweep catches up.
    """
    pool = ConnectionPool.from_url(
        redis_url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=30
    )
    return ArqRedis(connection_pool=pool)


async def queue_depth(queue: Queue) -> float:
    """What waits for a worker: ids on the delivery feed's list plus jobs in the default queue
    (deferred ones included), in one round trip."""
    async with queue.pipeline(transaction=False) as pipe:
        pipe.llen(READY_KEY)
        pipe.zcard(queue.default_queue_name)
        ready, jobs = await pipe.execute()
    return float(ready + jobs)


async def close_queue(queue: Queue) -> None:
    """Close the queue client and its connection pool."""
    await queue.aclose(close_connection_pool=True)


def delivery_job_id(message_id: uuid.UUID, resubmission: int = 0) -> str:
    """One job id per message, so enqueueing it twice queues it once.

    A resubmission decided by reconciliation gets its own (`deliver:{id}:r{n}`): the job of the
    attempt being reconciled may still have its key in Redis (a dead worker's), and arq silently
    drops a job whose id exists. A stray second job is harmless: the claim is conditional.
    """
    if resubmission:
        return f"deliver:{message_id}:r{resubmission}"
    return f"deliver:{message_id}"


async def enqueue_deliveries(
    queue: Queue, message_ids: Iterable[uuid.UUID], *, resubmission: int = 0
) -> int:
    """Queue delivery jobs; returns how many were queued. Never raises: on a Redis error the
    messages stay `queued` in PostgreSQL and the periodic sweep enqueues them."""
    queued = 0
    try:
        for message_id in message_ids:
            job = await queue.enqueue_job(
                DELIVER_JOB, str(message_id), _job_id=delivery_job_id(message_id, resubmission)
            )
            queued += job is not None
    except (RedisError, OSError) as error:
        REDIS.failed(error, action="enqueue; the sweep will retry")
    return queued


async def push_ready(
    queue: Queue, message_ids: Sequence[uuid.UUID | str], *, timeout: float | None = None
) -> int:
    """Hand newly accepted messages to the workers' feeds, in one command; returns how many.
    Never raises (as `enqueue_deliveries`: after a Redis error, or no answer within `timeout`,
    the sweep queues them; a push that landed after all leaves a second id on the feed, which
    the conditional claim makes harmless)."""
    if not message_ids:
        return 0
    try:
        async with asyncio.timeout(timeout):  # not wait_for: no task of its own per push
            await cast(Awaitable[int], queue.rpush(READY_KEY, *(str(i) for i in message_ids)))
    except (RedisError, OSError, TimeoutError) as error:
        REDIS.failed(error, action="enqueue; the sweep will retry")
        return 0
    REDIS.recovered()
    return len(message_ids)


class DeliveryBatcher:
    """Hands the messages that concurrent requests accepted to the workers' feeds together.

    Each request's messages wait `BATCH_LINGER_SECONDS` (by default, the rest of the event loop's
    turn) for others', then are pushed in one command; the request answers once its messages are
    queued, as it would alone (a 202 means stored and queued, unless Redis is down: then the sweep
    queues them).
    """

    def __init__(self, queue: Queue, *, linger: float = BATCH_LINGER_SECONDS) -> None:
        self._queue = queue
        self._linger = linger
        self._pending: list[uuid.UUID] = []
        self._queued: asyncio.Future[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def enqueue(self, message_ids: Sequence[uuid.UUID]) -> None:
        """Queue these messages with the others accepted meanwhile; never raises."""
        if not message_ids:
            return
        self._pending.extend(message_ids)
        if self._queued is None:
            self._queued = asyncio.get_running_loop().create_future()
            flush = asyncio.create_task(self._flush_soon(self._queued))
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        # Shielded: one request going away must not cancel the others' enqueue.
        await asyncio.shield(self._queued)

    async def _flush_soon(self, queued: asyncio.Future[None]) -> None:
        try:
            await asyncio.sleep(self._linger)
        finally:
            message_ids, self._pending, self._queued = self._pending, [], None
            try:
                await push_ready(self._queue, message_ids, timeout=PUSH_TIMEOUT_SECONDS)
            finally:
                queued.set_result(None)

    async def close(self) -> None:
        """Wait for the flushes in progress (on shutdown)."""
        if self._flushes:
            await asyncio.wait(set(self._flushes))


EVENTS_QUEUE = "arq:events"
DELIVER_EVENT_JOB = "deliver_event"


def event_job_id(job: EventJob) -> str:
    """One job id per event (plus a tag for redeliveries and wake-ups), so enqueueing an event
    twice queues it once."""
    return f"event:{job.event_id}" + (f":{job.tag}" if job.tag else "")


async def enqueue_events(queue: Queue, jobs: Iterable[EventJob]) -> int:
    """Queue event deliveries; returns how many were queued. Never raises: on a Redis error the
    events stay pending in PostgreSQL and the events sweep enqueues them."""
    queued = 0
    try:
        for job in jobs:
            queued_job = await queue.enqueue_job(
                DELIVER_EVENT_JOB,
                str(job.event_id),
                _job_id=event_job_id(job),
                _queue_name=EVENTS_QUEUE,
            )
            queued += queued_job is not None
    except (RedisError, OSError) as error:
        REDIS.failed(error, action="event enqueue; the sweep will retry")
    return queued
