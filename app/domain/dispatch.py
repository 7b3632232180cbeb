"""Before a queued message is claimed: which provider takes it, and may it go now.

`Dispatcher.admit` is the gate `deliver_message` passes first, in this order:
1. Routing: the message's provider, unless that provider's circuit is open and the sender names
   a fallback provider whose circuit is not: then the fallback. A message that was ever
   resubmitted after an unknown outcome stays where it is (its first submission may exist there:
   only that provider can say, and only it can keep the two from both reaching the handset).
   Without a usable fallback, the message waits for the circuit's next probe.
2. Pause: a provider that throttled us is left alone until its pause ends.
3. Pacing: the sender's rate (app.domain.pacing): is it the message's turn?
Waiting is never an attempt and never a failure: the job is deferred and the message stays
`queued`. The checks are repeated by the claim (status, due time, expiry, opt-out) in its own
transaction; the gate holds no database connection while it waits. After the claim, `pace`
takes the sender's slot immediately before the provider call; in the rare case the turn has
moved on meanwhile (more than a short wait), the claim is released (`transitions.release`).

When Redis cannot be reached the gate says "wait": the arq queue lives there too, so nothing
could be sent reliably anyway, and the sweep re-enqueues the message once Redis is back.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from redis.exceptions import RedisError
from sqlalchemy import select

from app.db.models import Message, Sender
from app.db.session import SessionFactory
from app.domain.circuit import CircuitState, Health, ProviderHealth
from app.domain.pacing import SenderPacer
from app.domain.status import MessageStatus
from app.metrics import RATE_LIMIT_DEFERRALS
from app.providers.base import Provider, ProviderError

log = logging.getLogger(__name__)

# While another worker probes an open circuit, look again this often (its result may come soon).
PROBE_RECHECK_SECONDS: Final = 2.0
# When Redis does not answer, try again after this long.
REDIS_DOWN_RETRY_SECONDS: Final = 5.0
# A job may start a little before the time it was deferred to: that is due (as for the claim).
DUE_TOLERANCE_SECONDS: Final = 0.1


@dataclass(frozen=True, slots=True)
class Go:
    """Claim the message and submit it to `provider` (a fallback when it differs from the
    message's own provider); `probe` when this submission tests a half-open circuit. `rate` is
    the sender's, for `Dispatcher.pace` (None: nothing to pace, the claim will say why)."""

    provider: str
    probe: bool = False
    rate: float | None = None
    home: str | None = None  # the message's own provider, when `provider` is its fallback


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: defer the job this long (the message stays queued; no attempt is counted)."""

    seconds: float
    reason: str


class Dispatcher:
    """The delivery gate: circuit breakers, provider pauses and sender pacing, in Redis."""

    def __init__(
        self, health: ProviderHealth, pacer: SenderPacer, providers: dict[str, Provider]
    ) -> None:
        self.health = health
        self.pacer = pacer
        self._providers = providers

    async def admit(self, session_factory: SessionFactory, message_id: uuid.UUID) -> Go | Wait:
        """Where and whether the message may be submitted now."""
        async with session_factory() as session:
            row = (
                await session.execute(
                    select(
                        Message.status,
                        Message.provider,
                        Message.sender_id,
                        Message.resubmissions,
                        Message.next_attempt_at,
                        Message.expires_at,
                        Sender.rate_per_second,
                        Sender.fallback_provider,
                    )
                    .join(Sender, Sender.id == Message.sender_id)
                    .where(Message.id == message_id)
                )
            ).one_or_none()
        now = datetime.now(UTC)
        if (
            row is None
            or row.status != MessageStatus.QUEUED.value
            or (row.expires_at is not None and row.expires_at <= now)
        ):
            # Nothing to send: the claim says why (and records it), without taking a slot.
            return Go(provider=row.provider if row is not None else "")
        not_due_for = (row.next_attempt_at - now).total_seconds()
        if not_due_for > DUE_TOLERANCE_SECONDS:  # picked up early: keep the backoff
            return Wait(not_due_for, "not_due")
        try:
            return await self._admit(
                message_id,
                provider=row.provider,
                fallback=row.fallback_provider if row.resubmissions == 0 else None,
                sender_id=row.sender_id,
                rate=row.rate_per_second,
            )
        except (RedisError, OSError) as error:
            log.warning("delivery gate unavailable", extra={"error": repr(error)})
            return Wait(REDIS_DOWN_RETRY_SECONDS, "redis_unavailable")

    async def _admit(
        self,
        message_id: uuid.UUID,
        *,
        provider: str,
        fallback: str | None,
        sender_id: uuid.UUID,
        rate: float,
    ) -> Go | Wait:
        home = provider
        health = await self.health.check(provider)
        if health.state is CircuitState.OPEN and fallback and fallback in self._providers:
            fallback_health = await self.health.check(fallback)
            if fallback_health.state is not CircuitState.OPEN:
                provider, health = fallback, fallback_health
        if health.state is CircuitState.OPEN:
            return self._wait_for(provider, health)
        if health.paused_for > 0:
            RATE_LIMIT_DEFERRALS.labels(provider=provider, reason="provider_paused").inc()
            return Wait(_jittered(health.paused_for), "provider_paused")
        wait = await self.pacer.wait_turn(sender_id, message_id, rate, provider=provider)
        if wait > 0:
            return Wait(wait, "sender_rate")
        return Go(
            provider=provider,
            probe=health.state is CircuitState.PROBE,
            rate=rate,
            home=home if provider != home else None,
        )

    async def pace(self, route: Go, message: Message) -> float:
        """After the claim, immediately before the provider call: take the sender's slot.
        0.0 to go; otherwise how long the message must wait (release the claim first)."""
        if route.rate is None:
            return 0.0
        try:
            return await self.pacer.admit(
                message.sender_id, message.id, route.rate, provider=message.provider
            )
        except (RedisError, OSError) as error:
            log.warning("delivery gate unavailable", extra={"error": repr(error)})
            return REDIS_DOWN_RETRY_SECONDS

    @staticmethod
    def _wait_for(provider: str, health: Health) -> Wait:
        RATE_LIMIT_DEFERRALS.labels(provider=provider, reason="circuit_open").inc()
        return Wait(_jittered(min(health.open_for, PROBE_RECHECK_SECONDS * 5)), "circuit_open")

    async def record(self, provider: str, error: ProviderError | None) -> None:
        """Tell the circuit breaker (and the pause) how a submission went; never raises."""
        try:
            changed = await self.health.record(provider, error)
        except (RedisError, OSError) as exc:
            log.warning("circuit breaker unavailable", extra={"error": repr(exc)})
            return
        if changed > 0:
            log.warning("circuit opened", extra={"provider": provider})
        elif changed < 0:
            log.info("circuit closed", extra={"provider": provider})


def _jittered(seconds: float) -> float:
    """`seconds` plus up to a quarter more, so deferred messages do not all return at once."""
    return max(seconds, 0.05) * random.uniform(1.0, 1.25)
