"""Putting work on the arq queue. The API and the sweep use this; nothing else touches arq."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DELIVER_JOB = "deliver"
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
