"""Putting work on the arq queue. The API and the sweep use this; nothing else touches arq."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Final

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DELIVER_JOB = "deliver"
DELIVER_BATCH_JOB = "deliver_batch"
# The most messages one batch job carries: larger batches are split, so that several workers
# share a bulk send. A job costs about twenty Redis commands, whatever it carries.
BATCH_JOB_MAX: Final = 50
# How long the API lets the messages of concurrent requests gather before queueing them.
BATCH_LINGER_SECONDS: Final = 0.005
FAKE_REPORT_JOB = "fake_status_report"

Queue = ArqRedis


def create_queue(redis_url: str) -> Queue:
    """A queue client that connects lazily, so the API starts (and accepts) while Redis is down.

    Short timeouts: when Redis is unreachable an accept must not hang; the sweep catches up.
    """
    pool = ConnectionPool.from_url(
        redis_url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=30
    )
    return ArqRedis(connection_pool=pool)


async def queue_depth(queue: Queue) -> float:
    """Jobs waiting in the default queue, deferred ones included."""
    return float(await queue.zcard(queue.default_queue_name))


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
        log.warning("enqueue failed; the sweep will retry", extra={"error": repr(error)})
    return queued


async def enqueue_batches(queue: Queue, message_ids: Sequence[uuid.UUID]) -> int:
    """Queue messages as batch jobs of up to `BATCH_JOB_MAX`, all in one round trip; returns how
    many messages were queued. Never raises (as `enqueue_deliveries`: the sweep catches up after
    a Redis error).

    arq's `enqueue_job` first checks (WATCH, EXISTS) that no job has the id; a batch job's id is
    new and random, so the jobs are written as arq writes them (the job under its key, its id in
    the queue) in one MULTI/EXEC for all.
    """
    if not message_ids:
        return 0
    now_ms = int(time.time() * 1000)
    try:
        async with queue.pipeline(transaction=True) as pipe:
            for start in range(0, len(message_ids), BATCH_JOB_MAX):
                chunk = [
                    str(message_id) for message_id in message_ids[start : start + BATCH_JOB_MAX]
                ]
                job_id = f"batch:{uuid.uuid4()}"
                job = serialize_job(DELIVER_BATCH_JOB, (chunk,), {}, None, now_ms)
                pipe.psetex(job_key_prefix + job_id, queue.expires_extra_ms, job)
                pipe.zadd(queue.default_queue_name, {job_id: now_ms})
            await pipe.execute()
    except (RedisError, OSError) as error:
        log.warning("enqueue failed; the sweep will retry", extra={"error": repr(error)})
        return 0
    return len(message_ids)


class DeliveryBatcher:
    """Queues the messages that concurrent requests accepted as shared batch jobs.

    Each request's messages wait `BATCH_LINGER_SECONDS` for others', then go on the queue
    together; the request answers once its messages are queued, as it would alone (a 202 means
    stored and queued, unless Redis is down: then the sweep queues them).
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
                await enqueue_batches(self._queue, message_ids)
            finally:
                queued.set_result(None)

    async def close(self) -> None:
        """Wait for the flushes in progress (on shutdown)."""
        if self._flushes:
            await asyncio.wait(set(self._flushes))
