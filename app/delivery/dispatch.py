"""The delivery gate: which provider takes each claimed message, and when it may go.

`Dispatcher.gate` answers for every message a delivery job claimed, at once, in this order:
1. Routing: the message's provider, unless that provider's circuit is open and the sender names
   a fallback provider whose circuit is not: then the fallback. A message that was ever
   resubmitted after an unknown outcome stays where it is (its first submission may exist there:
   only that provider can say, and only it can keep the two from both reaching the handset).
   Without a usable fallback, the message waits for the circuit's next probe; when the probe is
   due, one message of the job is it and the others wait for its result.
2. Pause: a provider that throttled us is left alone until its pause ends.
3. Pacing: the sender's rate (app.delivery.pacing). Each sender's messages take a run of
   consecutive slots in one step; a message beyond that run (the sender has a line) takes its
   own place in line, waits for it when it is near, or is put back to wait for it.
Each provider is asked once and each sender once, whatever the job carries; a job of one provider
and one sender (most jobs) asks both in one Redis round trip (`_GATE`). A message that
waits is put back by the caller (`transitions.release`): waiting is never an attempt and never a
failure. The gate runs between transactions: it holds no database connection.

When Redis cannot be reached the gate says "wait": the queue lives there too, so nothing could
be sent reliably anyway, and the sweep re-enqueues the message once Redis is back.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from redis.exceptions import RedisError

from app.delivery.circuit import CHECK_LUA, CircuitState, Health, ProviderHealth
from app.delivery.pacing import DEFER_LEAD_SECONDS, RESERVE_LUA, Reservation, SenderPacer
from app.kernel.metrics import RATE_LIMIT_DEFERRALS
from app.kernel.outages import REDIS
from app.providers.base import Provider, ProviderError

log = logging.getLogger(__name__)

# While another worker probes an open circuit, look again this often (its result may come soon).
PROBE_RECHECK_SECONDS: Final = 2.0
# When Redis does not answer, try again after this long.
REDIS_DOWN_RETRY_SECONDS: Final = 5.0
# How far ahead a job's run of slots may reach. A run's messages go at their slots without
# asking Redis again, so a Redis restart (which forgets the pace) in the middle of a run lets
# the sender go faster by at most the rest of the run, once: kept short. Messages beyond it
# take their own places in the sender's line, each checked just before its call.
RUN_HORIZON_SECONDS: Final = 0.25

# The common job (one provider, one sender) in one round trip: the provider's circuit and pause,
# then, only if it is closed and not paused, the sender's run of slots. KEYS: circuit, pause,
# TAT, line; ARGV: probe ms, interval ms, wanted, ahead ms. Returns the check's three values,
# then the run's count and first ms, and 1 if the run was reserved.
_GATE: Final = (
    CHECK_LUA
    + RESERVE_LUA
    + """
local health = circuit_check(KEYS[1], KEYS[2], ARGV[1], '1')
if health[1] ~= 0 or health[3] ~= 0 then return {health[1], health[2], health[3], 0, '0', 0} end
local run = reserve_run(KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], '1')
return {health[1], health[2], health[3], run[1], run[2], 1}
"""
)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What the gate needs of one claimed message."""

    message_id: uuid.UUID
    provider: str
    sender_id: uuid.UUID
    rate: float
    fallback: str | None  # None when it has none or was resubmitted after an unknown outcome


@dataclass(frozen=True, slots=True)
class Go:
    """Submit the message to `provider` (its fallback when `home` is set: its own provider)
    when `at` (`time.monotonic()`) has come. With `in_line`, its sender has a line: it takes
    its own place in it first (`take_turn`), at the sender's `rate`."""

    provider: str
    at: float = 0.0
    home: str | None = None
    in_line: bool = False
    rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: put the message back for this long (it stays queued; no attempt is counted)."""

    seconds: float
    reason: str


Verdict = Go | Wait


class Dispatcher:
    """The delivery gate: circuit breakers, provider pauses and sender pacing, in Redis."""

    def __init__(
        self, health: ProviderHealth, pacer: SenderPacer, providers: dict[str, Provider]
    ) -> None:
        self.health = health
        self.pacer = pacer
        self._providers = providers
        self._gate_script = health.redis.register_script(_GATE)

    async def gate(self, tickets: Sequence[Ticket]) -> dict[uuid.UUID, Verdict]:
        """Where and when each message may be submitted, or how long it must wait."""
        try:
            healths, reserved = await self._first_look(tickets)
            routed = await self._route(tickets, healths)
            return await self._pace(tickets, routed, reserved)
        except (RedisError, OSError) as error:
            REDIS.failed(error, action="delivery gate")
            return {
                t.message_id: Wait(REDIS_DOWN_RETRY_SECONDS, "redis_unavailable") for t in tickets
            }

    async def _first_look(
        self, tickets: Sequence[Ticket]
    ) -> tuple[dict[str, Health], tuple[uuid.UUID, Reservation, float] | None]:
        """For a job of one provider and one sender (most jobs): the provider's health and,
        when it may be called now, the sender's run of slots (with when it was reserved), in
        one round trip. Other jobs ask each provider and sender in turn."""
        first = tickets[0]
        if any(t.provider != first.provider or t.sender_id != first.sender_id for t in tickets):
            return {}, None
        answer = await self._gate_script(
            keys=self.health.keys(first.provider) + self.pacer.run_keys(first.sender_id),
            args=[
                self.health.probe_timeout_ms,
                *self.pacer.run_arguments(first.rate, len(tickets), RUN_HORIZON_SECONDS),
            ],
        )
        reserved_at = time.monotonic()
        state, wait_ms, pause_ms, count, first_ms, was_reserved = answer
        healths = {first.provider: self.health.health(state, wait_ms, pause_ms)}
        if not int(was_reserved):
            return healths, None
        run = self.pacer.reservation(first.rate, count, first_ms)
        return healths, (first.sender_id, run, reserved_at)

    async def _route(
        self, tickets: Sequence[Ticket], known: dict[str, Health]
    ) -> dict[uuid.UUID, Verdict]:
        """Each message's provider (its own or its fallback), or why it must wait; `known`:
        healths already asked for (not asked again: asking may make this job the probe)."""
        healths = dict(known)
        probing: set[str] = set()  # providers whose probe this job already makes

        async def health_of(provider: str) -> Health:
            if provider not in healths:
                healths[provider] = await self.health.check(provider)
            return healths[provider]

        def state_of(provider: str) -> CircuitState:
            # A half-open circuit takes one probe: after this job's, it reads as open.
            state = healths[provider].state
            return CircuitState.OPEN if provider in probing else state

        verdicts: dict[uuid.UUID, Verdict] = {}
        for ticket in tickets:
            provider = ticket.provider
            await health_of(provider)
            if (
                state_of(provider) is CircuitState.OPEN
                and ticket.fallback
                and ticket.fallback in self._providers
            ):
                await health_of(ticket.fallback)
                if state_of(ticket.fallback) is not CircuitState.OPEN:
                    provider = ticket.fallback
            health, state = healths[provider], state_of(provider)
            if state is CircuitState.OPEN:
                verdicts[ticket.message_id] = self._wait_for(provider, health)
                continue
            if health.paused_for > 0:
                RATE_LIMIT_DEFERRALS.labels(provider=provider, reason="provider_paused").inc()
                verdicts[ticket.message_id] = Wait(_jittered(health.paused_for), "provider_paused")
                continue
            if state is CircuitState.PROBE:
                probing.add(provider)
            home = ticket.provider if provider != ticket.provider else None
            verdicts[ticket.message_id] = Go(provider, home=home)
        return verdicts

    async def _pace(
        self,
        tickets: Sequence[Ticket],
        routed: dict[uuid.UUID, Verdict],
        reserved: tuple[uuid.UUID, Reservation, float] | None,
    ) -> dict[uuid.UUID, Verdict]:
        """Give every routed message its sender's next slot: a run of consecutive slots per
        sender in one step (`reserved`: the run `_first_look` took); a message beyond the run
        takes its place in the sender's line itself, just before its call (`take_turn`)."""
        by_sender: defaultdict[uuid.UUID, list[Ticket]] = defaultdict(list)
        for ticket in tickets:
            if isinstance(routed[ticket.message_id], Go):
                by_sender[ticket.sender_id].append(ticket)
        verdicts = dict(routed)
        for sender_id, group in by_sender.items():
            if reserved is not None and reserved[0] == sender_id:
                _, slots, reserved_at = reserved
            else:
                slots = await self.pacer.reserve(
                    sender_id, group[0].rate, len(group), consume=True, horizon=RUN_HORIZON_SECONDS
                )
                reserved_at = time.monotonic()
            for index, ticket in enumerate(group):
                go = verdicts[ticket.message_id]
                assert isinstance(go, Go)
                if index < slots.count:
                    verdicts[ticket.message_id] = replace(go, at=reserved_at + slots.offset(index))
                else:
                    verdicts[ticket.message_id] = await self._join_line(ticket, go)
        return verdicts

    async def _join_line(self, ticket: Ticket, go: Go) -> Verdict:
        """A message beyond its sender's free run takes a place in the sender's line: it waits
        for a near turn itself (`take_turn`), or is put back until just before a later one."""
        slot = await self.pacer.take(
            ticket.sender_id, ticket.message_id, ticket.rate, consume=False
        )
        if slot.queued:
            RATE_LIMIT_DEFERRALS.labels(provider=go.provider, reason="sender_rate").inc()
        if slot.wait <= self.pacer.max_inline_wait:
            return replace(go, in_line=True, rate=ticket.rate)
        return Wait(max(slot.wait - DEFER_LEAD_SECONDS, DEFER_LEAD_SECONDS), "sender_rate")

    async def take_turn(self, go: Go, sender_id: uuid.UUID, message_id: uuid.UUID) -> float:
        """For a message whose sender has a line, immediately before its call: take its slot,
        sleeping through a short wait (0.0: go now); otherwise how long until its turn (put it
        back; it keeps its place in line)."""
        try:
            return await self.pacer.admit(sender_id, message_id, go.rate, provider=go.provider)
        except (RedisError, OSError) as error:
            REDIS.failed(error, action="delivery gate")
            return REDIS_DOWN_RETRY_SECONDS

    @staticmethod
    def _wait_for(provider: str, health: Health) -> Wait:
        RATE_LIMIT_DEFERRALS.labels(provider=provider, reason="circuit_open").inc()
        wait = health.open_for if health.state is CircuitState.OPEN else PROBE_RECHECK_SECONDS
        return Wait(_jittered(min(wait, PROBE_RECHECK_SECONDS * 5)), "circuit_open")

    async def record(self, provider: str, error: ProviderError | None) -> None:
        """Tell the circuit breaker (and the pause) how a submission went; never raises."""
        try:
            changed = await self.health.record(provider, error)
        except (RedisError, OSError) as exc:
            REDIS.failed(exc, action="circuit breaker")
            return
        if changed > 0:
            log.warning("circuit opened", extra={"provider": provider})
        elif changed < 0:
            log.info("circuit closed", extra={"provider": provider})


def _jittered(seconds: float) -> float:
    """`seconds` plus up to a quarter more, so deferred messages do not all return at once."""
    return max(seconds, 0.05) * random.uniform(1.0, 1.25)
