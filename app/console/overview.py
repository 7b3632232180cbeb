"""The operator's overview: the last 24 hours of messages by status, the delivery rate by
provider and by sender, each provider's breaker and pause, and the queue's depth and age.

The traffic is one grouped read of the window's messages, found through the BRIN index
`ix_messages_created_brin` (migration `console_views`): it reads the window's blocks, not the
table. Breakers, pauses and the queue are read as /metrics reads them (app.health.readings,
app.worker.queue), from Redis, after the database session is closed: no network call while a
transaction is open.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, Sender
from app.db.session import SessionFactory
from app.delivery.circuit import CircuitState
from app.health.readings import oldest_queued_age, oldest_sending_age, read_provider_health
from app.kernel.status import MessageStatus
from app.worker.queue import Queue, queue_depth

WINDOW: Final = timedelta(hours=24)
REDIS_TIMEOUT_SECONDS: Final = 2.0
# A delivery rate counts the messages whose fate is known: delivered, or not (canceled ones were
# stopped by an opt-out, not lost by a carrier, and count on neither side).
NOT_DELIVERED: Final = frozenset(
    {
        MessageStatus.UNDELIVERED,
        MessageStatus.FAILED,
        MessageStatus.REJECTED,
        MessageStatus.EXPIRED,
    }
)


@dataclass(frozen=True, slots=True)
class StatusCount:
    """How many of the window's messages are in one status now."""

    status: str
    count: int
    percent: float  # of the window's messages


@dataclass(frozen=True, slots=True)
class Rate:
    """Delivered among the messages with a known fate, for one provider or sender."""

    label: str
    delivered: int
    settled: int  # delivered + not delivered

    @property
    def percent(self) -> float | None:
        """The delivery rate in percent; None before any message settled."""
        return 100.0 * self.delivered / self.settled if self.settled else None


@dataclass(frozen=True, slots=True)
class Traffic:
    """The window's messages."""

    since: datetime
    total: int
    by_status: list[StatusCount]  # in lifecycle order, statuses with none left out
    by_provider: list[Rate]
    by_sender: list[Rate]


@dataclass(frozen=True, slots=True)
class ProviderState:
    """A provider's breaker and pause; `breaker` "unknown" when Redis did not answer."""

    provider: str
    breaker: str  # closed, open, unknown
    open_for: float
    paused_for: float


@dataclass(frozen=True, slots=True)
class QueueState:
    """What waits: the queue's depth (None: Redis did not answer), the oldest queued message's
    age and the oldest `sending` claim's, in seconds."""

    depth: float | None
    oldest_queued_age: float
    oldest_sending_age: float


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the overview page shows."""

    traffic: Traffic
    providers: list[ProviderState]
    queue: QueueState


def _rates(counts: dict[str, dict[str, int]]) -> list[Rate]:
    rates = []
    for label, statuses in counts.items():
        delivered = statuses.get(MessageStatus.DELIVERED.value, 0)
        failed = sum(statuses.get(status.value, 0) for status in NOT_DELIVERED)
        rates.append(Rate(label=label, delivered=delivered, settled=delivered + failed))
    return sorted(rates, key=lambda rate: rate.label)


async def traffic(session: AsyncSession, *, now: datetime | None = None) -> Traffic:
    """The last 24 hours' messages by status, and the delivery rate by provider and sender."""
    since = (now or datetime.now(UTC)) - WINDOW
    counts = (
        select(Message.provider, Message.sender_id, Message.status, func.count().label("n"))
        .where(Message.created_at >= since)
        .group_by(Message.provider, Message.sender_id, Message.status)
        .subquery()
    )
    rows = await session.execute(
        select(counts.c.provider, Sender.address, counts.c.status, counts.c.n).join(
            Sender, Sender.id == counts.c.sender_id
        )
    )
    by_status: dict[str, int] = defaultdict(int)
    by_provider: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_sender: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for provider, address, status, n in rows:
        by_status[status] += n
        by_provider[provider][status] += n
        by_sender[address][status] += n
    total = sum(by_status.values())
    return Traffic(
        since=since,
        total=total,
        by_status=[
            StatusCount(status.value, by_status[status.value], 100.0 * by_status[status] / total)
            for status in MessageStatus
            if by_status.get(status.value)
        ],
        by_provider=_rates(by_provider),
        by_sender=_rates(by_sender),
    )


async def _queue_depth(queue: Queue) -> float | None:
    try:
        return await asyncio.wait_for(queue_depth(queue), REDIS_TIMEOUT_SECONDS)
    except Exception:  # Redis unreachable: unknown
        return None


async def overview(
    sessions: SessionFactory,
    queue: Queue,
    providers: Iterable[str],
    *,
    now: datetime | None = None,
) -> Overview:
    """The overview: the database read in one short session, then Redis (outside it)."""
    now = now or datetime.now(UTC)
    async with sessions() as session:
        window = await traffic(session, now=now)
        queued_age = await oldest_queued_age(session, now)
        sending_age = await oldest_sending_age(session, now)
    readings = await read_provider_health(queue, sorted(providers), timeout=REDIS_TIMEOUT_SECONDS)
    return Overview(
        traffic=window,
        providers=[
            ProviderState(
                provider=reading.provider,
                breaker="unknown"
                if reading.health is None
                else ("closed" if reading.health.state is CircuitState.CLOSED else "open"),
                open_for=reading.health.open_for if reading.health else 0.0,
                paused_for=reading.health.paused_for if reading.health else 0.0,
            )
            for reading in readings
        ],
        queue=QueueState(
            depth=await _queue_depth(queue),
            oldest_queued_age=queued_age,
            oldest_sending_age=sending_age,
        ),
    )
