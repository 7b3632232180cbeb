"""The events worker: delivers webhooks from the `arq:events` queue, and sweeps for lost jobs.

Run it with `smsgate worker --queue events` (or `arq app.worker.events.EventsWorkerSettings`),
beside the SMS worker; run several of either as load requires.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from typing import Any, ClassVar

from arq import Retry, cron, func

from app.db.session import create_engine, create_session_factory
from app.events.delivery import (
    attempt_budget_seconds,
    build_events_http_client,
    deliver_event,
    sweep_events,
)
from app.kernel.metrics import serve_metrics
from app.kernel.secrets import Keyring, install
from app.kernel.settings import get_settings
from app.worker.guarantees import worker_redis_settings
from app.worker.queue import DELIVER_EVENT_JOB, EVENTS_QUEUE, enqueue_events
from app.worker.resilience import stop_watching_database, watch_database

# One attempt (bounded by EVENTS__TIMEOUT_SECONDS) plus two short transactions.
JOB_TIMEOUT_SECONDS = math.ceil(attempt_budget_seconds(get_settings().events))


async def startup(ctx: dict[str, Any]) -> None:
    """Build the worker's engine, sessions and HTTP client (its own, apart from providers')."""
    # Tests pass their own settings (and may pass a resolver) in the worker's ctx.
    settings = ctx.get("settings") or get_settings()
    ctx["settings"] = settings
    # Every attempt is signed with secrets stored encrypted: no key, no start.
    install(Keyring.from_settings(settings))
    ctx["engine"] = create_engine(settings.database_url)
    ctx["session_factory"] = create_session_factory(ctx["engine"])
    ctx["events_http"] = build_events_http_client(settings.events)
    watch_database(ctx)
    serve_metrics(settings.events_worker_metrics_port, settings.metrics_host)


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close what startup opened."""
    await stop_watching_database(ctx)
    await ctx["events_http"].aclose()
    await ctx["engine"].dispose()


async def deliver_event_job(ctx: dict[str, Any], event_id: str) -> str | None:
    """Attempt one event; enqueue the next in its line when it is done; retry later if due."""
    extra = {"resolver": ctx["resolver"]} if "resolver" in ctx else {}
    outcome = await deliver_event(
        uuid.UUID(event_id),
        ctx["session_factory"],
        ctx["events_http"],
        ctx["settings"].events,
        **extra,
    )
    await enqueue_events(ctx["redis"], outcome.jobs)
    if outcome.retry_in is not None:
        raise Retry(defer=timedelta(seconds=outcome.retry_in))
    return outcome.status.value if outcome.status else None


async def sweep_events_job(ctx: dict[str, Any]) -> int:
    """Re-enqueue pending events whose job was lost (Redis was down, a worker died)."""
    jobs = await sweep_events(
        ctx["session_factory"], grace=timedelta(seconds=ctx["settings"].sweep_grace_seconds)
    )
    return await enqueue_events(ctx["redis"], jobs)


class EventsWorkerSettings:
    """arq's configuration for the events worker."""

    functions: ClassVar[list[Any]] = [func(deliver_event_job, name=DELIVER_EVENT_JOB)]
    cron_jobs: ClassVar[list[Any]] = [
        cron(sweep_events_job, second=set(range(0, 60, 10)), run_at_startup=True)
    ]
    queue_name = EVENTS_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = worker_redis_settings(get_settings().redis_url)
    job_timeout = JOB_TIMEOUT_SECONDS
    keep_result = 0  # outcomes are in PostgreSQL; a kept result would block re-enqueueing by id
    # Our retry window decides when to give up; arq also counts deferrals behind a busy endpoint.
    max_tries = 100_000
    max_jobs = 50
    allow_abort_jobs = False
    # On SIGTERM, let attempts in flight finish (they are short) instead of leaving leases.
    job_completion_wait = JOB_TIMEOUT_SECONDS
    health_check_interval = 10
