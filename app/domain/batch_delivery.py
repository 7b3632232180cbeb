"""Delivering a batch of newly accepted messages with a few statements and Redis calls in all.

The API puts the messages its concurrent requests accepted into one job (app.worker.queue).
Delivered one by one, each would cost a dozen database round trips and as many Redis commands
besides its provider call; here the batch shares them:
1. a read of the messages and their senders (its transaction ended before any Redis call);
   per provider, one look at its circuit and pause, and per sender one count of the slots free
   now (in Redis); then one claim transaction (`transitions.claim`, the claim of every delivery:
   recipients' locks, opt-out check, expiry, conditional UPDATE, history rows);
2. per sender, one reservation of consecutive slots, then each message is submitted at its slot
   (each answer told to the provider's circuit breaker as it arrives);
3. one transaction recording the acceptances.

Only the common case takes this path: a healthy provider (circuit closed, not paused), a sender
whose line is empty, a message that is queued, due and unexpired. Every other message goes
through `deliver_message`, one at a time, which handles each case (failover, the half-open
probe, waiting in line, Redis down). Both paths claim with the same function, so a message is
submitted once whichever path, or paths, see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, Sender
from app.db.session import SessionFactory
from app.domain.circuit import CircuitState
from app.domain.delivery import (
    NOT_DUE_TOLERANCE_SECONDS,
    Outcome,
    RetryPolicy,
    Submitted,
    deliver_message,
    record_submissions,
    release_claim,
    submit,
)
from app.domain.dispatch import Dispatcher, Go
from app.domain.events import EventJob
from app.domain.pacing import Reservation
from app.domain.status import MessageStatus
from app.domain.transitions import Claim, claim, run_transaction
from app.providers.base import Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the gate needs to know of one message."""

    id: uuid.UUID
    provider: str
    sender_id: uuid.UUID
    rate: float
    to: str
    kind: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What became of a batch: each message's outcome, and the event deliveries to enqueue."""

    outcomes: dict[uuid.UUID, Outcome]
    events: tuple[EventJob, ...]


async def deliver_batch(
    message_ids: Sequence[uuid.UUID],
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    dispatcher: Dispatcher,
) -> BatchResult:
    """Deliver these messages: the common case together, the rest one by one (concurrently)."""
    async with session_factory() as session:  # ended before the gate: no Redis call inside
        candidates, others = await _read(session, message_ids, providers)
    ready, waiting = await _gate(dispatcher, candidates)
    claimed, outcomes, events = await _claim(session_factory, ready)
    others += waiting

    async def one_by_one(ids: list[uuid.UUID]) -> dict[uuid.UUID, Outcome]:
        results = await asyncio.gather(
            *(deliver_message(i, session_factory, providers, policy, dispatcher) for i in ids)
        )
        return dict(zip(ids, results, strict=True))

    singles = asyncio.create_task(one_by_one(others))
    try:
        rates = {c.sender_id: c.rate for c in ready}
        submitted, refused, released = await _submit_all(
            claimed, rates, session_factory, providers, policy, dispatcher
        )
        outcomes |= refused
        moved, recorded = await _record(session_factory, submitted, dispatcher)
        events += recorded
        outcomes |= await one_by_one(released)
    except BaseException:
        # Cancelled (or failed): `deliver_message` undoes a claim whose call had not started and
        # records an interrupted call as an unknown outcome.
        singles.cancel()
        await asyncio.gather(singles, return_exceptions=True)
        raise
    outcomes |= await singles
    for item in submitted:
        outcomes[item.message.id] = Outcome(
            MessageStatus.SENT if item.message.id in moved else None
        )
    all_events = events + tuple(event for outcome in outcomes.values() for event in outcome.events)
    log.info(
        "batch delivered",
        extra={
            "messages": len(message_ids),
            "together": len(submitted),
            "alone": len(others) + len(released),
        },
    )
    return BatchResult(outcomes, all_events)


async def _read(
    session: AsyncSession, message_ids: Sequence[uuid.UUID], providers: dict[str, Provider]
) -> tuple[list[Candidate], list[uuid.UUID]]:
    """The messages that may take the batch path, and the others."""
    now = datetime.now(UTC)
    rows = (
        await session.execute(
            select(
                Message.id,
                Message.status,
                Message.provider,
                Message.sender_id,
                Message.to,
                Message.kind,
                Message.next_attempt_at,
                Message.expires_at,
                Sender.rate_per_second,
            )
            .join(Sender, Sender.id == Message.sender_id)
            .where(Message.id.in_(message_ids))
        )
    ).all()
    candidates, others = [], []
    for row in rows:
        usual = (
            row.status == MessageStatus.QUEUED.value
            and row.provider in providers
            and (row.next_attempt_at - now).total_seconds() <= NOT_DUE_TOLERANCE_SECONDS
            and (row.expires_at is None or row.expires_at > now)
        )
        if usual:
            candidates.append(
                Candidate(
                    row.id, row.provider, row.sender_id, row.rate_per_second, row.to, row.kind
                )
            )
        elif row.status == MessageStatus.QUEUED.value:
            others.append(row.id)
        # Not queued (already sent, or gone): nothing to do, as `deliver_message` would find.
    return candidates, others


async def _gate(
    dispatcher: Dispatcher, candidates: list[Candidate]
) -> tuple[list[Candidate], list[uuid.UUID]]:
    """The candidates whose provider is healthy and whose sender has a free slot now (a first
    look; the slots are taken after the claim); the others' ids."""
    ready: list[Candidate] = []
    waiting: list[uuid.UUID] = []
    by_provider: defaultdict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_provider[candidate.provider].append(candidate)
    try:
        for provider, group in by_provider.items():
            health = await dispatcher.health.check(provider, may_probe=False)
            if health.state is not CircuitState.CLOSED or health.paused_for > 0:
                waiting += [c.id for c in group]
                continue
            for sender_group in _by_sender(group).values():
                first = sender_group[0]
                free = await dispatcher.pacer.reserve(
                    first.sender_id, first.rate, len(sender_group), consume=False
                )
                ready += sender_group[: free.count]
                waiting += [c.id for c in sender_group[free.count :]]
    except (RedisError, OSError) as error:
        log.warning("delivery gate unavailable", extra={"error": repr(error)})
        return [], [c.id for c in candidates]
    return ready, waiting


def _by_sender(candidates: Sequence[Candidate]) -> dict[uuid.UUID, list[Candidate]]:
    groups: defaultdict[uuid.UUID, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        groups[candidate.sender_id].append(candidate)
    return groups


async def _claim(
    session_factory: SessionFactory, ready: list[Candidate]
) -> tuple[list[Message], dict[uuid.UUID, Outcome], tuple[EventJob, ...]]:
    """Claim the ready messages with the one claim of every delivery (app.domain.transitions):
    the claimed messages, the others' outcomes (expired, canceled for an opt-out, nothing to
    do), and the event deliveries written."""
    if not ready:
        return [], {}, ()
    ids = [c.id for c in ready]

    async def work(session: AsyncSession) -> Claim:
        return await claim(session, ids)

    claimed, events = await run_transaction(session_factory, work)
    return claimed.claimed, claimed.outcomes, events


async def _submit_all(
    claimed: list[Message],
    rates: dict[uuid.UUID, float],
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    dispatcher: Dispatcher,
) -> tuple[list[Submitted], dict[uuid.UUID, Outcome], list[uuid.UUID]]:
    """Take each sender's slots, then submit every claimed message at its slot, concurrently.

    Returns the acceptances (for the caller to record), the outcomes already recorded (refusals
    and errors), and the ids released because their slot was gone (for the one-by-one path).
    """
    released: list[uuid.UUID] = []
    tasks: dict[uuid.UUID, asyncio.Task[Submitted | Outcome]] = {}
    by_sender: defaultdict[uuid.UUID, list[Message]] = defaultdict(list)
    for message in claimed:
        by_sender[message.sender_id].append(message)
    try:
        for sender_id, messages in by_sender.items():
            try:
                slots = await dispatcher.pacer.reserve(
                    sender_id, rates[sender_id], len(messages), consume=True
                )
            except (RedisError, OSError) as error:
                log.warning("delivery gate unavailable", extra={"error": repr(error)})
                slots = Reservation(count=0, first=0.0, interval=0.0)
            reserved_at = time.monotonic()
            for message in messages[slots.count :]:  # the turn moved on since the first look
                await release_claim(
                    session_factory, message, "the sender's pace", Go(message.provider)
                )
                released.append(message.id)
            for index, message in enumerate(messages[: slots.count]):
                tasks[message.id] = asyncio.create_task(
                    _submit_at(
                        reserved_at + slots.offset(index),
                        message,
                        providers[message.provider],
                        session_factory,
                        policy,
                        dispatcher,
                    )
                )
        if tasks:
            await asyncio.wait(tasks.values())
    except BaseException:
        # Cancelled: each task records its own message (released before its call, unknown
        # outcome during it); the acceptances already made are recorded before leaving.
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks.values())
        await asyncio.shield(_record(session_factory, _accepted(tasks.values()), dispatcher))
        raise
    outcomes = {
        message_id: result
        for message_id, task in tasks.items()
        if isinstance(result := task.result(), Outcome)
    }
    return _accepted(tasks.values()), outcomes, released


def _accepted(tasks: Iterable[asyncio.Task[Submitted | Outcome]]) -> list[Submitted]:
    """The acceptances among finished tasks."""
    return [
        result
        for task in tasks
        if task.done()
        and not task.cancelled()
        and task.exception() is None
        and isinstance(result := task.result(), Submitted)
    ]


async def _submit_at(
    at: float,
    message: Message,
    provider: Provider,
    session_factory: SessionFactory,
    policy: RetryPolicy,
    dispatcher: Dispatcher,
) -> Submitted | Outcome:
    """Wait for the message's slot (`time.monotonic()` value), then submit it."""
    try:
        if (delay := at - time.monotonic()) > 0:
            await asyncio.sleep(delay)
    except BaseException:  # cancelled before the provider was called: undo the claim
        await asyncio.shield(
            release_claim(
                session_factory, message, "cancelled before the provider call", Go(provider.name)
            )
        )
        raise
    return await submit(message, provider, session_factory, policy, dispatcher)


async def _record(
    session_factory: SessionFactory, submitted: list[Submitted], dispatcher: Dispatcher
) -> tuple[set[uuid.UUID], tuple[EventJob, ...]]:
    """Record the acceptances together (each breaker was told of each success as it came)."""
    return await record_submissions(session_factory, submitted)
