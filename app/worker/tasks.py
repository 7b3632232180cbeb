"""arq task shells and worker settings: each task opens what it needs and calls a plain function.

Run a worker with `smsgate worker` (or `arq app.worker.tasks.WorkerSettings`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from signal import Signals
from typing import Any, ClassVar

from arq import Retry, cron, func
from arq.worker import get_kwargs
from redis.exceptions import RedisError

from app.db.retention import prune
from app.db.session import create_engine, create_session_factory
from app.delivery.pipeline import Outcome, RetryPolicy, deliver_message
from app.delivery.pipeline import deliver as deliver_messages
from app.delivery.reconcile import STATUS_CHECK_SWEEP_SECONDS
from app.delivery.sweep import sweep_once
from app.delivery.transitions import record_status_report
from app.events.outbox import EventJob
from app.kernel.logs import message_context
from app.kernel.metrics import serve_metrics
from app.kernel.outages import REDIS, unavailable_dependency
from app.kernel.settings import Settings, get_settings
from app.kernel.status import MessageStatus
from app.providers.base import CallbackRequest
from app.providers.registry import build_http_client, build_providers
from app.traffic.held import Settler
from app.worker.feed import DeliveryFeed
from app.worker.guarantees import (
    RedisFakeLedger,
    build_dispatcher,
    delivery_job_timeout_seconds,
    reconcile,
    reconcile_sweep,
    status_check,
    status_check_sweep,
    worker_redis_settings,
)
from app.worker.queue import (
    DELIVER_JOB,
    FAKE_REPORT_JOB,
    delivery_job_id,
    enqueue_deliveries,
    enqueue_events,
    push_ready,
)
from app.worker.resilience import ResilientWorker, stop_watching_database, watch_database
from app.worker.scheduler import Scheduler

log = logging.getLogger(__name__)

# A delivery job is one provider call plus two short transactions: its timeout is the provider
# call's budget plus a margin, so a call is never cut short by the job timeout (which would leave
# its outcome unknown), yet a dead worker's claim is reconciled soon (app.worker.guarantees).
JOB_TIMEOUT_SECONDS = delivery_job_timeout_seconds(get_settings())
# A batch job waits at most this long for room in the worker (`InFlightLimit`) before it puts
# its remaining messages back on the queue; its timeout is a delivery job's plus this wait.
BATCH_WAIT_SECONDS = 5.0
# A retention run (many short batches) may take minutes on its first run over a large database.
RETENTION_TIMEOUT_SECONDS = 900
# Half the connections of a worker's pool for its sweeps, reconciliation and status checks.
WORKER_POOL_SPARE = 4


async def startup(ctx: dict[str, Any]) -> None:
    """Build the worker's engine, sessions, HTTP client and provider adapters."""
    # Tests pass their own settings and HTTP client (with a mock transport) in the worker's ctx.
    settings = ctx.get("settings") or get_settings()
    ctx["settings"] = settings
    ctx["engine"] = create_engine(
        settings.database_url, pool_size=worker_pool_size(settings), max_overflow=0
    )
    ctx["session_factory"] = create_session_factory(ctx["engine"])
    # The delivery road's own pool: its statements find messages by key, so its sessions keep
    # one plan per statement (see `create_engine`); the sweeps keep the other, planned anew.
    ctx["delivery_engine"] = create_engine(
        settings.database_url,
        pool_size=delivery_pool_size(settings),
        max_overflow=0,
        generic_plans=True,
    )
    ctx["delivery_sessions"] = create_session_factory(ctx["delivery_engine"])
    if "http" not in ctx:
        ctx["http"] = build_http_client(settings)
    queue = ctx["redis"]

    async def schedule_fake_report(params: Mapping[str, str], delay: float) -> None:
        await queue.enqueue_job(FAKE_REPORT_JOB, dict(params), _defer_by=timedelta(seconds=delay))

    ctx["providers"] = build_providers(
        settings, ctx["http"], schedule_fake_report, fake_ledger=RedisFakeLedger(queue)
    )
    ctx["dispatcher"] = build_dispatcher(queue, settings, ctx["providers"])
    ctx["in_flight"] = InFlightLimit(settings.worker_concurrency)
    watch_database(ctx)
    serve_metrics(settings.worker_metrics_port, settings.metrics_host)
    ctx["retry_policy"] = RetryPolicy(
        max_attempts=settings.send_max_attempts,
        base_delay=settings.retry_base_delay_seconds,
        max_delay=settings.retry_max_delay_seconds,
    )
    ctx["feed"] = DeliveryFeed(
        queue, lambda ids: deliver_ids(ctx, ids), ctx["in_flight"], db_outage=ctx["db_outage"]
    )
    ctx["feed"].start()
    ctx["scheduler"] = Scheduler(
        ctx["session_factory"],
        queue,
        poll_seconds=settings.scheduler_poll_seconds,
        db_outage=ctx["db_outage"],
    )
    ctx["scheduler"].start()


def worker_pool_size(settings: Settings) -> int:
    """Database connections a worker keeps for its sweeps, reconciliation, status checks and
    reports (the deliveries have their own pool, `delivery_pool_size`): a few, each held
    briefly, so jobs beyond them wait for one. No overflow: a connection opened for a burst and
    closed after it costs PostgreSQL ~2 ms of CPU each time; the pool opens connections only as
    the load needs them and keeps them."""
    return min(settings.worker_concurrency, settings.db_pool_size, 2 * WORKER_POOL_SPARE)


def delivery_pool_size(settings: Settings) -> int:
    """Database connections of the delivery road: one per message in flight at most (a job
    holds one for its claim, then one per record at a time), `DB_POOL_SIZE` at most; opened as
    the load needs them, no overflow (as `worker_pool_size`)."""
    return min(settings.worker_concurrency, settings.db_pool_size)


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop the feed (its deliveries under way get the job timeout to finish, as jobs do on
    SIGTERM), then close what startup opened."""
    await ctx["scheduler"].stop()
    await ctx["feed"].stop(wait=JOB_TIMEOUT_SECONDS)
    await stop_watching_database(ctx)
    await ctx["http"].aclose()
    await ctx["engine"].dispose()
    await ctx["delivery_engine"].dispose()


class InFlightLimit:
    """At most `limit` messages of this worker between claim and provider answer at once: the
    HTTP client's connections, and the provider's patience, are finite. Taken in chunks: a
    batch takes what is free (at least one) and waits for more only for its remaining messages,
    so batches never wait on each other while holding a part."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._changed = asyncio.Condition()

    async def take(self, wanted: int) -> int:
        """Wait until something is free; take up to `wanted` of it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._free > 0)
            taken = min(wanted, self._free)
            self._free -= taken
            return taken

    async def wait_free(self) -> int:
        """Wait until something is free; how much (nothing is taken: the delivery takes it)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._free > 0)
            return self._free

    async def give(self, count: int) -> None:
        """Return what `take` gave."""
        async with self._changed:
            self._free += count
            self._changed.notify_all()


async def deliver(ctx: dict[str, Any], message_id: str) -> str | None:
    """Deliver one message; ask arq to run the job again later when a retry is due."""
    in_flight: InFlightLimit = ctx["in_flight"]
    await in_flight.take(1)
    try:
        with message_context(message_id):
            outcome = await deliver_message(
                uuid.UUID(message_id),
                ctx["delivery_sessions"],
                ctx["providers"],
                ctx["retry_policy"],
                dispatcher=ctx["dispatcher"],
            )
    finally:
        await in_flight.give(1)
    await enqueue_events(ctx["redis"], outcome.events)  # on the events queue, after commit
    if outcome.retry_in is not None:
        raise Retry(defer=timedelta(seconds=outcome.retry_in))
    return outcome.status.value if outcome.status else None


async def deliver_batch(ctx: dict[str, Any], message_ids: list[str]) -> int:
    """A job of newly accepted messages (queued by an API before the delivery feed existed, or
    put back by a full worker): delivered as the feed delivers them."""
    return await deliver_ids(ctx, message_ids)


async def deliver_ids(ctx: dict[str, Any], message_ids: list[str]) -> int:
    """Deliver messages together (app.delivery.pipeline, the road every job takes), in chunks of
    what the in-flight limit allows; a message that must wait gets a job of its own, deferred.
    Returns how many were sent."""
    in_flight: InFlightLimit = ctx["in_flight"]
    pending = [uuid.UUID(message_id) for message_id in message_ids]

    async def chunk(ids: list[uuid.UUID]) -> dict[uuid.UUID, Outcome]:
        try:
            result = await deliver_messages(
                ids,
                ctx["delivery_sessions"],
                ctx["providers"],
                ctx["retry_policy"],
                ctx["dispatcher"],
                budget=JOB_TIMEOUT_SECONDS,
            )
        finally:
            await in_flight.give(len(ids))
        await enqueue_events(ctx["redis"], result.events)
        return result.outcomes

    running: list[asyncio.Task[dict[uuid.UUID, Outcome]]] = []
    deadline = time.monotonic() + BATCH_WAIT_SECONDS
    try:
        while pending:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    taken = await in_flight.take(len(pending))
            except TimeoutError:
                # The worker is full: the rest go back to the feed for any worker, unclaimed.
                await push_ready(ctx["redis"], pending)
                break
            running.append(asyncio.create_task(chunk(pending[:taken])))
            pending = pending[taken:]
        finished = await asyncio.gather(*running, return_exceptions=True)
    except BaseException:
        # Cancelled: the chunks under way are cancelled too (each puts back what it had not
        # sent and records what it had), and awaited, before the worker closes its clients.
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    outcomes = _outcomes(ctx, finished)
    await _defer_retries(ctx, outcomes)
    return sum(outcome.status is MessageStatus.SENT for outcome in outcomes.values())


def _outcomes(
    ctx: dict[str, Any], finished: list[dict[uuid.UUID, Outcome] | BaseException]
) -> dict[uuid.UUID, Outcome]:
    """The chunks' outcomes together; a chunk that failed is reported, and the others count."""
    outcomes: dict[uuid.UUID, Outcome] = {}
    for done in finished:
        if isinstance(done, BaseException):
            # That chunk put back or recorded its messages as far as it got (a chunk past its
            # budget, a database error): the sweep and reconciliation take it from there. The
            # other chunks' outcomes still count.
            if "db_outage" in ctx and unavailable_dependency(done) == "postgresql":
                ctx["db_outage"].failed(done, action="delivery")
            else:
                log.error("delivery of a chunk failed", exc_info=done)
            continue
        outcomes |= done
    return outcomes


async def _defer_retries(ctx: dict[str, Any], outcomes: dict[uuid.UUID, Outcome]) -> None:
    """A deferred job for each message that must wait before its next try."""
    try:
        for message_id, outcome in outcomes.items():
            if outcome.retry_in is not None:
                await ctx["redis"].enqueue_job(
                    DELIVER_JOB,
                    str(message_id),
                    _job_id=delivery_job_id(message_id),
                    _defer_by=timedelta(seconds=outcome.retry_in),
                )
    except (RedisError, OSError) as error:  # still queued in PostgreSQL: the sweep retries them
        REDIS.failed(error, action="retry enqueue; the sweep will retry")


async def fake_status_report(ctx: dict[str, Any], params: dict[str, str]) -> bool:
    """Apply a report scheduled by the fake provider, through the real status path."""
    report = ctx["providers"]["fake"].parse_status_callback(
        CallbackRequest(url="", method="QUEUE", params=params, headers={})
    )
    applied, events = await record_status_report(ctx["session_factory"], "fake", report)
    await enqueue_events(ctx["redis"], events)
    return applied


async def sweep(ctx: dict[str, Any]) -> int:
    """Re-enqueue queued messages that are due but not on the queue (e.g. Redis was down)."""
    settings = ctx["settings"]
    message_ids = await sweep_once(
        ctx["session_factory"],
        grace=timedelta(seconds=settings.sweep_grace_seconds),
    )
    return await enqueue_deliveries(ctx["redis"], message_ids)


async def retention(ctx: dict[str, Any]) -> int:
    """Prune what has outlived its retention period (app.db.retention), in small batches; and
    cancel what was held longer than `PUMPING__HELD_MAX_DAYS` (app.traffic.held)."""
    settings: Settings = ctx["settings"]
    pruned = await prune(ctx["session_factory"], settings.retention, settings.idempotency_ttl_hours)
    pruned["held_messages"] = await cancel_stale_held(ctx)
    if any(pruned.values()):
        log.info("retention pruned rows", extra={"pruned": pruned})
    return sum(pruned.values())


async def cancel_stale_held(ctx: dict[str, Any]) -> int:
    """Cancel the messages held longer than `PUMPING__HELD_MAX_DAYS`, in bounded chunks."""
    settings: Settings = ctx["settings"]

    async def deliveries(ids: Sequence[uuid.UUID]) -> None:
        await enqueue_deliveries(ctx["redis"], ids)  # none: a cancel releases nothing

    async def events(jobs: Sequence[EventJob]) -> int:
        return await enqueue_events(ctx["redis"], jobs)

    settler = Settler(ctx["session_factory"], deliveries, events)
    return await settler.cancel_stale(
        settings.pumping.held_max_days, max_chunks=settings.retention.max_batches_per_run
    )


class DeliveryWorker(ResilientWorker):
    """arq's worker, which also stops its delivery feed the moment a stop signal arrives (arq
    itself only stops taking jobs then): what the feed already started gets the rest of the
    same grace period (`job_completion_wait`), not a second one after it."""

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        """Close the feed, then arq's own handling."""
        feed: DeliveryFeed | None = self.ctx.get("feed")
        if feed is not None:
            feed.close()
        super().handle_sig_wait_for_completion(signum)


def run_delivery_worker() -> None:
    """`smsgate worker`: a `DeliveryWorker` with `WorkerSettings`, as arq's `run_worker`."""
    settings: dict[str, Any] = get_kwargs(WorkerSettings)  # type: ignore[arg-type]
    DeliveryWorker(**settings).run()


class WorkerSettings:
    """arq's configuration for the delivery worker."""

    functions: ClassVar[list[Any]] = [
        deliver,
        func(deliver_batch, timeout=JOB_TIMEOUT_SECONDS + BATCH_WAIT_SECONDS),
        fake_status_report,
        reconcile,
        status_check,
    ]
    cron_jobs: ClassVar[list[Any]] = [
        cron(sweep, second=set(range(0, 60, 10)), run_at_startup=True),
        # Claims a dead worker left behind, every 5 s: recovery takes the job timeout plus that.
        cron(reconcile_sweep, second=set(range(2, 60, 5)), run_at_startup=True),
        # `sent` messages whose final report is overdue (a lost callback): ask their provider,
        # every STATUS_CHECK_SWEEP_SECONDS, at most STATUS_CHECK_RATE_PER_MINUTE.
        cron(status_check_sweep, second=set(range(7, 60, STATUS_CHECK_SWEEP_SECONDS))),
        # Every five minutes, one worker (arq runs each cron job once across workers).
        cron(
            retention, minute=set(range(1, 60, 5)), second={23}, timeout=RETENTION_TIMEOUT_SECONDS
        ),
    ]
    on_startup = startup
    on_shutdown = shutdown
    # Retries Redis commands through a restart or a dropped connection (app.worker.guarantees).
    redis_settings = worker_redis_settings(get_settings().redis_url)
    job_timeout = JOB_TIMEOUT_SECONDS
    keep_result = 0  # results are in PostgreSQL; a kept result would block re-enqueueing by id
    # Our own attempt count in PostgreSQL decides when to give up; arq's counter also grows when a
    # worker dies mid-job, and reaching it would strand the message as `queued`.
    max_tries = 1000
    max_jobs = 50
    # How often a worker looks for due jobs (one ZRANGEBYSCORE each time). New messages do not
    # wait for it: they come through the delivery feed's blocking pop (app.worker.feed). Jobs
    # are retries, deferrals and sweeps, which a quarter of a second more or less does not
    # change, while a 20 ms poll cost an idle worker about 4% of a core.
    poll_delay = 0.25
    allow_abort_jobs = False
    # On SIGTERM (a deploy), let running jobs finish their provider call instead of cancelling it.
    job_completion_wait = JOB_TIMEOUT_SECONDS
    # `smsgate worker --check` passes while a worker refreshed its key within this (+1 s); each
    # refresh logs a line when the job counts changed (the sweep runs every 10 s).
    health_check_interval = 30
