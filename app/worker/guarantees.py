"""The worker's side of the delivery guarantees: the delivery gate (circuit breakers, provider
pauses, sender pacing), reconciliation of unknown outcomes, and the fake provider's ledger.

`reconcile_sweep` runs every few seconds on one worker (an arq cron job): it finds `sending`
messages whose claim is older than a delivery job can last and enqueues one `reconcile` job per
message (job id per message, so a message is reconciled by one job at a time, on any worker).

`status_check_sweep` runs every `STATUS_CHECK_SWEEP_SECONDS`: it picks `sent` messages whose
status check is due (app.delivery.reconcile: first `STATUS_CHECK_AFTER_SECONDS` after their last
news, then with back-off, until the horizon), this run's share of `STATUS_CHECK_RATE_PER_MINUTE`,
and enqueues one `status_check` job per message, deferred so that the lookups start evenly spread
at that rate (after an outage, the backlog is worked off at the provider's pace, not in a burst).
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import timedelta
from typing import Any, Final

from arq import Retry
from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.delivery.circuit import CircuitPolicy, ProviderHealth
from app.delivery.dispatch import Dispatcher
from app.delivery.pacing import MAX_INLINE_WAIT_SECONDS, SenderPacer
from app.delivery.reconcile import (
    STATUS_CHECK_SWEEP_SECONDS,
    CheckSchedule,
    Decision,
    check_status,
    oldest_sent_age,
    overdue_sent,
    reconcile_message,
    stale_claims,
)
from app.kernel.logs import message_context
from app.kernel.metrics import OLDEST_SENT_AGE
from app.kernel.outages import REDIS
from app.kernel.settings import Settings, provider_call_budget_seconds
from app.providers.base import Provider
from app.worker.queue import Queue, enqueue_deliveries, enqueue_events

log = logging.getLogger(__name__)

RECONCILE_JOB: Final = "reconcile"
STATUS_CHECK_JOB: Final = "status_check"
# What the fake "provider" remembers of what it accepted, for reconciliation to ask.
FAKE_LEDGER_TTL_SECONDS: Final = 7 * 24 * 3600


def worker_redis_settings(redis_url: str) -> RedisSettings:
    """arq's connection to Redis, retrying each command through a dropped connection or a Redis
    restart (about 20 s of backoff) instead of letting the worker crash on the first error."""
    settings = RedisSettings.from_dsn(redis_url)
    settings.retry_on_timeout = True
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    settings.retry = RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=12)
    settings.conn_retries = 30
    return settings


def delivery_job_timeout_seconds(settings: Settings) -> int:
    """A delivery job: at most a pacing wait in the job, one provider call, two short
    transactions. Sized so the job timeout never cuts a provider call short (its outcome would
    become unknown), yet a dead worker's claim is reconciled within seconds of it."""
    return math.ceil(provider_call_budget_seconds(settings) + MAX_INLINE_WAIT_SECONDS) + 8


class RedisFakeLedger:
    """The fake provider's memory, in Redis, shared by every worker (a real provider keeps its
    own); lost with Redis, after which a reconciled fake message is sent again."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    @staticmethod
    def _key(message_id: uuid.UUID) -> str:
        return f"smsgate:fake:accepted:{message_id}"

    async def remember(self, message_id: uuid.UUID, provider_message_id: str) -> None:
        """Note that the fake accepted `message_id`."""
        await self._redis.set(
            self._key(message_id), provider_message_id.encode(), ex=FAKE_LEDGER_TTL_SECONDS
        )

    async def recall(self, message_id: uuid.UUID) -> str | None:
        """The fake's id for `message_id`, if it accepted it."""
        value = await self._redis.get(self._key(message_id))
        return value.decode() if isinstance(value, bytes) else None


def build_dispatcher(
    redis: Redis, settings: Settings, providers: dict[str, Provider]
) -> Dispatcher:
    """The delivery gate for this worker, on the queue's Redis."""
    policy = CircuitPolicy(
        failure_threshold=settings.circuit_failure_threshold,
        window_seconds=settings.circuit_window_seconds,
        open_seconds=settings.circuit_open_seconds,
        probe_timeout_seconds=provider_call_budget_seconds(settings),
        throttle_pause_seconds=settings.throttle_pause_seconds,
    )
    return Dispatcher(ProviderHealth(redis, policy), SenderPacer(redis), providers)


def reconcile_job_id(message_id: uuid.UUID) -> str:
    """One reconciliation job per message at a time."""
    return f"reconcile:{message_id}"


async def enqueue_reconciliations(queue: Queue, message_ids: list[uuid.UUID]) -> int:
    """Queue reconciliation jobs; never raises (the next sweep finds the messages again)."""
    queued = 0
    try:
        for message_id in message_ids:
            job = await queue.enqueue_job(
                RECONCILE_JOB, str(message_id), _job_id=reconcile_job_id(message_id)
            )
            queued += job is not None
    except (RedisError, OSError) as error:
        REDIS.failed(error, action="reconcile enqueue")
    return queued


async def reconcile_sweep(ctx: dict[str, Any]) -> int:
    """Queue a reconciliation for each `sending` message whose claim has outlived its job."""
    settings: Settings = ctx["settings"]
    stale = await stale_claims(
        ctx["session_factory"], timedelta(seconds=delivery_job_timeout_seconds(settings))
    )
    return await enqueue_reconciliations(ctx["redis"], stale)


async def reconcile(ctx: dict[str, Any], message_id: str) -> str:
    """Settle one stale `sending` message (app.delivery.reconcile); resubmit it if need be."""
    settings: Settings = ctx["settings"]
    with message_context(message_id):
        result = await reconcile_message(
            uuid.UUID(message_id),
            ctx["session_factory"],
            ctx["providers"],
            ctx["retry_policy"],
            older_than=timedelta(seconds=delivery_job_timeout_seconds(settings)),
            give_up_after=timedelta(seconds=settings.unknown_outcome_give_up_seconds),
        )
    await enqueue_events(ctx["redis"], result.events)
    if result.decision is Decision.RESUBMIT:
        # Under its own job id: the reconciled attempt's job key may outlive its dead worker.
        await enqueue_deliveries(
            ctx["redis"], [uuid.UUID(message_id)], resubmission=result.resubmission or 1
        )
    if result.decision is Decision.LATER and result.retry_in is not None:
        raise Retry(defer=timedelta(seconds=result.retry_in))
    return result.decision.value


def status_check_job_id(message_id: uuid.UUID) -> str:
    """One status check per message at a time."""
    return f"status-check:{message_id}"


def status_check_pace(settings: Settings) -> tuple[int, float]:
    """How many checks one sweep run queues, and the seconds between two of them."""
    rate = settings.status_check_rate_per_minute
    return math.ceil(rate * STATUS_CHECK_SWEEP_SECONDS / 60), 60 / rate


async def status_check_sweep(ctx: dict[str, Any]) -> int:
    """Queue a status check for each `sent` message whose check is due, at the configured
    rate (and set the gauge of the oldest `sent` message, whatever its provider)."""
    settings: Settings = ctx["settings"]
    providers: dict[str, Provider] = ctx["providers"]
    OLDEST_SENT_AGE.set(await oldest_sent_age(ctx["session_factory"]))
    batch, spacing = status_check_pace(settings)
    due = await overdue_sent(
        ctx["session_factory"],
        [name for name, provider in providers.items() if provider.can_fetch_status],
        CheckSchedule.from_settings(settings),
        limit=batch,
    )
    queued = 0
    try:
        for position, message_id in enumerate(due):
            job = await ctx["redis"].enqueue_job(
                STATUS_CHECK_JOB,
                str(message_id),
                _job_id=status_check_job_id(message_id),
                _defer_by=timedelta(seconds=position * spacing),
            )
            queued += job is not None
    except (RedisError, OSError) as error:
        # Each picked message's next check is already scheduled: it is asked about then.
        REDIS.failed(error, action="status check enqueue")
    return queued


async def status_check(ctx: dict[str, Any], message_id: str) -> str:
    """Ask the provider about one `sent` message whose final report is overdue."""
    settings: Settings = ctx["settings"]
    with message_context(message_id):
        result = await check_status(
            uuid.UUID(message_id),
            ctx["session_factory"],
            ctx["providers"],
            CheckSchedule.from_settings(settings),
        )
    await enqueue_events(ctx["redis"], result.events)
    return result.decision.value
