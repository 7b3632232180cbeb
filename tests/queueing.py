"""What is waiting for delivery in Redis: the delivery feed's list and the arq queue's jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import cast

from arq.jobs import deserialize_job
from redis.asyncio import Redis

from app.worker.queue import DELIVER_BATCH_JOB, DELIVER_JOB, READY_KEY


async def ready_ids(redis: Redis) -> list[str]:
    """The ids waiting on the delivery feed's list, in order."""
    # redis-py types its list commands for both its clients; this one is asyncio's.
    items = await cast(Awaitable[list[bytes]], redis.lrange(READY_KEY, 0, -1))
    return [item.decode() for item in items]


async def ready_length(redis: Redis) -> int:
    """How many ids wait on the delivery feed's list."""
    return await cast(Awaitable[int], redis.llen(READY_KEY))


async def push_ids(redis: Redis, ids: Sequence[str]) -> None:
    """Put ids on the feed's list as the API does (tests that arrange a backlog)."""
    await cast(Awaitable[int], redis.rpush(READY_KEY, *ids))


async def queued_jobs(redis: Redis) -> list[tuple[str, list[str]]]:
    """(function, message ids) of every delivery job waiting on the arq queue."""
    jobs = []
    for job_id in await redis.zrange("arq:queue", 0, -1):
        data = await redis.get(f"arq:job:{job_id.decode()}")
        if data is None:
            continue
        job = deserialize_job(data)
        if job.function == DELIVER_JOB:
            jobs.append((job.function, [job.args[0]]))
        elif job.function == DELIVER_BATCH_JOB:
            jobs.append((job.function, list(job.args[0])))
    return jobs


async def queued_message_ids(redis: Redis) -> list[str]:
    """Ids of the messages waiting for delivery: on the feed's list, then in the delivery jobs
    waiting on the queue (single and batch jobs), once per place that carries them."""
    ids = await ready_ids(redis)
    for _, carried in await queued_jobs(redis):
        ids.extend(carried)
    return ids
