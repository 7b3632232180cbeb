"""Putting event deliveries on their own arq queue, apart from SMS delivery jobs.

Events have a queue (`arq:events`) and a worker of their own (`smsgate worker --queue events`),
so a slow or dead client endpoint can never hold up an SMS: the SMS worker never runs an event
job, whatever happens to receivers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis.exceptions import RedisError

from app.events.outbox import EventJob
from app.kernel.outages import REDIS
from app.worker.queue import Queue

log = logging.getLogger(__name__)

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
