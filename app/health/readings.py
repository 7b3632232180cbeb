"""The service's state read now, for /metrics and the operator console: the oldest queued and
`sending` messages' ages, and each provider's breaker and pause (read, never probed)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message
from app.delivery.circuit import CircuitPolicy, Health, ProviderHealth
from app.kernel.status import MessageStatus


async def oldest_queued_age(session: AsyncSession, now: datetime | None = None) -> float:
    """Seconds the oldest queued message has waited, counted from when it was due: a scheduled
    message promoted today waited for its `send_at` by design, and must not read as days old.
    The queued rows only (the partial `ix_messages_queued_due` finds them)."""
    due = func.coalesce(Message.send_at, Message.created_at)
    oldest = await session.scalar(
        select(func.min(due)).where(Message.status == MessageStatus.QUEUED.value)
    )
    return ((now or datetime.now(UTC)) - oldest).total_seconds() if oldest else 0.0


async def oldest_sending_age(session: AsyncSession, now: datetime | None = None) -> float:
    """Seconds the oldest `sending` claim has been held (ix_messages_sending_claimed)."""
    oldest = await session.scalar(
        select(func.min(Message.claimed_at)).where(Message.status == MessageStatus.SENDING.value)
    )
    return ((now or datetime.now(UTC)) - oldest).total_seconds() if oldest else 0.0


@dataclass(frozen=True, slots=True)
class ProviderReading:
    """One provider's breaker and pause, or None where Redis did not answer."""

    provider: str
    health: Health | None


async def read_provider_health(
    redis: Redis, providers: Iterable[str], *, timeout: float = 2.0
) -> list[ProviderReading]:
    """Each provider's breaker and pause as the delivery gate sees them; reading never makes the
    caller the half-open probe. Any failure (Redis down) reads as None for that provider."""
    health = ProviderHealth(redis, CircuitPolicy())
    readings = []
    for provider in providers:
        try:
            state: Health | None = await asyncio.wait_for(
                health.check(provider, may_probe=False), timeout
            )
        except Exception:  # Redis unreachable or slow: unknown, not an error page
            state = None
        readings.append(ProviderReading(provider, state))
    return readings
