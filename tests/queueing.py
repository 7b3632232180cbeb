"""What is on the delivery queue, read from Redis as arq stores it."""

from __future__ import annotations

from arq.jobs import deserialize_job
from redis.asyncio import Redis

from app.worker.queue import DELIVER_BATCH_JOB, DELIVER_JOB


async def queued_message_ids(redis: Redis) -> list[str]:
    """Ids of the messages in the delivery jobs waiting on the queue (single and batch jobs),
    once per job that carries them."""
    ids: list[str] = []
    for job_id in await redis.zrange("arq:queue", 0, -1):
        data = await redis.get(f"arq:job:{job_id.decode()}")
        if data is None:
            continue
        job = deserialize_job(data)
        if job.function == DELIVER_JOB:
            ids.append(job.args[0])
        elif job.function == DELIVER_BATCH_JOB:
            ids.extend(job.args[0])
    return ids
