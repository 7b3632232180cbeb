"""Delivering one queued message: claim it, call its provider, record the outcome.

Safe to run any number of times for the same message: the claim is a conditional UPDATE
(queued -> sending), so only one run gets to call the provider. No database connection is held
while the provider call is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import SmallInteger, String, column, func, select, update, values
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.domain.dispatch import Dispatcher, Go, Wait
from app.domain.events import EventJob, emit_message_status, emit_message_statuses, scheduled
from app.domain.optouts import is_opted_out, lock_recipients, record_provider_opt_out
from app.domain.status import MessageStatus
from app.metrics import PROVIDER_REQUEST_SECONDS, RATE_LIMIT_DEFERRALS, count_status
from app.providers.base import (
    Accepted,
    Encoding,
    ErrorKind,
    OutboundSms,
    Provider,
    ProviderError,
)

log = logging.getLogger(__name__)

# The only messages sent to a recipient who opted out: the confirmation of that opt-out, and the
# answer to HELP (which is always answered).
PASSES_OPT_OUT = frozenset({"opt_out_confirmation", "help_reply"})

# A job may start a little before the time it was deferred to (clocks, rounding): that is due.
NOT_DUE_TOLERANCE_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry a retryable failure."""

    max_attempts: int
    base_delay: float
    max_delay: float

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter, never sooner than the provider asked (but never
        longer than `max_delay`, whatever it asked)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        return min(max(delay, retry_after or 0.0), self.max_delay)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery run; `retry_in` is set when it must run again later, and
    `events` are the event deliveries its committed transactions wrote (to enqueue)."""

    status: MessageStatus | None
    retry_in: float | None = None
    events: tuple[EventJob, ...] = ()


async def deliver_message(
    message_id: uuid.UUID,
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    dispatcher: Dispatcher | None = None,
) -> Outcome:
    """Take a queued message through one provider submission.

    With a `dispatcher` (the worker always has one), the message first passes its gate: the
    provider's circuit breaker (and failover), the provider's pause, the sender's pace.
    """
    route: Go | None = None
    if dispatcher is not None:
        admitted = await dispatcher.admit(session_factory, message_id)
        if isinstance(admitted, Wait):
            return Outcome(MessageStatus.QUEUED, retry_in=admitted.seconds)
        route = admitted
    claimed = await _claim(session_factory, message_id, route)
    if isinstance(claimed, Outcome):
        return claimed
    message = claimed
    if dispatcher is not None and route is not None:
        # The sender's slot is taken last, so a slow claim cannot bunch submissions together.
        try:
            wait = await dispatcher.pace(route, message)
        except BaseException:  # cancelled before the provider was called: undo the claim
            await asyncio.shield(
                dispatcher.release(
                    session_factory, message, "cancelled before the provider call", route
                )
            )
            raise
        if wait > 0:
            await dispatcher.release(
                session_factory, message, f"the sender's pace; next turn in {wait:.1f}s", route
            )
            return Outcome(MessageStatus.QUEUED, retry_in=wait)
    provider = providers.get(message.provider)
    if provider is None:
        error = ProviderError(
            ErrorKind.PERMANENT,
            f"provider {message.provider!r} is not configured on this worker",
            code="provider_not_configured",
        )
        return await _record_failure(session_factory, message, error, policy)
    submitted = await submit(message, provider, session_factory, policy, dispatcher)
    if isinstance(submitted, Outcome):
        return submitted
    moved, events = await record_submissions(session_factory, [submitted])
    return Outcome(MessageStatus.SENT if moved else None, events=events)


@dataclass(frozen=True, slots=True)
class Submitted:
    """A claimed message the provider accepted, not yet recorded as `sent`."""

    message: Message
    provider: str
    accepted: Accepted


async def submit(
    message: Message,
    provider: Provider,
    session_factory: SessionFactory,
    policy: RetryPolicy,
    dispatcher: Dispatcher | None,
) -> Submitted | Outcome:
    """Call the provider for a claimed message. The circuit breaker is told of each answer as
    it arrives (so a success resets the failures before it, in the order they happened); a
    refusal or error is recorded here (retry, failure or unknown outcome); an acceptance is
    returned for `record_submissions`."""
    sms = OutboundSms(
        message_id=message.id,
        to=message.to,
        sender=message.from_,
        body=message.body,
        encoding=Encoding(message.encoding),
        validity_seconds=_remaining_validity(message),
    )
    started = time.perf_counter()
    try:
        accepted = await provider.send(sms)
    except ProviderError as error:
        _observe(provider.name, error.kind.value, started)
        if dispatcher is not None:
            await dispatcher.record(provider.name, error)
        return await _record_failure(session_factory, message, error, policy)
    except BaseException as error:
        _observe(provider.name, "interrupted", started)
        # Cancelled (worker shutdown, job timeout) or a bug: the request may have gone out, so
        # this is an unknown outcome, never a reason to resend. Record it even while cancelled.
        log.exception("provider call interrupted", extra={"message_id": str(message.id)})
        unknown = ProviderError(
            ErrorKind.UNKNOWN_OUTCOME, f"provider call interrupted: {error!r}", code="interrupted"
        )
        await asyncio.shield(_record_failure(session_factory, message, unknown, policy))
        raise
    _observe(provider.name, "accepted", started)
    if dispatcher is not None:
        await dispatcher.record(provider.name, None)
    log.info(
        "message submitted",
        extra={
            "message_id": str(message.id),
            "provider": provider.name,
            "provider_message_id": accepted.provider_message_id,
        },
    )
    return Submitted(message, provider.name, accepted)


async def record_submissions(
    session_factory: SessionFactory, submitted: Sequence[Submitted]
) -> tuple[set[uuid.UUID], tuple[EventJob, ...]]:
    """Record that the provider accepted these messages, in one transaction: the ids that moved
    to `sent`, and the event deliveries written.

    A fast delivery report may already have moved a message past `sent` (or a later attempt
    may own it): then only the provider's id is recorded.
    """
    if not submitted:
        return set(), ()
    accepted = values(
        column("id", UUID), column("attempts", SmallInteger), column("pid", String), name="accepted"
    ).data([(s.message.id, s.message.attempts, s.accepted.provider_message_id) for s in submitted])
    async with session_factory.begin() as session:
        moved = set(
            await session.scalars(
                update(Message)
                .where(
                    Message.id == accepted.c.id,
                    Message.status == MessageStatus.SENDING.value,
                    Message.attempts == accepted.c.attempts,  # this attempt, not a later one
                )
                .values(status=MessageStatus.SENT.value, provider_message_id=accepted.c.pid)
                .returning(Message.id)
                .execution_options(synchronize_session=False)
            )
        )
        for late in (s for s in submitted if s.message.id not in moved):
            await session.execute(
                update(Message)
                .where(Message.id == late.message.id)
                .values(provider_message_id=late.accepted.provider_message_id)
            )
        session.add_all(
            MessageEvent(
                message_id=s.message.id,
                status=MessageStatus.SENT.value,
                applied=s.message.id in moved,
                source="worker",
                detail=f"accepted by {s.provider} as {s.accepted.provider_message_id}",
            )
            for s in submitted
        )
        await emit_message_statuses(
            session, [s.message for s in submitted if s.message.id in moved]
        )
    for s in submitted:
        if s.message.id in moved:
            count_status(MessageStatus.SENT.value, s.message.provider, s.message.from_)
    return moved, scheduled(session)


def _observe(provider: str, outcome: str, started: float) -> None:
    PROVIDER_REQUEST_SECONDS.labels(provider=provider, outcome=outcome).observe(
        time.perf_counter() - started
    )


async def _claim(
    session_factory: SessionFactory, message_id: uuid.UUID, route: Go | None = None
) -> Message | Outcome:
    """Move the message from queued to sending, or say why there is nothing to do. With a
    `route` to another provider (failover), the message moves to that provider as it is claimed,
    so its callbacks and any reconciliation go there too."""
    async with session_factory.begin() as session:
        message = await session.scalar(select(Message).where(Message.id == message_id))
        if message is None or message.status != MessageStatus.QUEUED.value:
            return Outcome(None)
        now = datetime.now(UTC)
        if message.expires_at is not None and now >= message.expires_at:
            return await _finish_unsent(
                session, message, MessageStatus.EXPIRED, "validity period ended before sending"
            )
        wait = (message.next_attempt_at - now).total_seconds()
        if wait > NOT_DUE_TOLERANCE_SECONDS:
            # Picked up early (a duplicate job, a restarted worker): keep the backoff.
            return Outcome(MessageStatus.QUEUED, retry_in=wait)
        # Under the recipient's lock: a STOP recorded before this point is seen, and one
        # recorded after it finds the message already claimed.
        await lock_recipients(session, [message.to])
        if message.kind not in PASSES_OPT_OUT and await is_opted_out(
            session, message.to, message.sender_id
        ):
            return await _finish_unsent(
                session,
                message,
                MessageStatus.CANCELED,
                "recipient opted out after the message was accepted",
                error_code="recipient_opted_out",
            )
        accepted_by = message.provider  # the RETURNING below refreshes `message` too
        claimed: Message | None = await session.scalar(
            update(Message)
            .where(Message.id == message_id, Message.status == MessageStatus.QUEUED.value)
            .values(
                status=MessageStatus.SENDING.value,
                attempts=Message.attempts + 1,
                claimed_at=func.now(),
                provider=route.provider if route is not None else message.provider,
            )
            .returning(Message)
        )
        if claimed is None:  # another run claimed it between our read and our update
            return Outcome(None)
        detail = f"attempt {claimed.attempts}"
        if claimed.provider != accepted_by:
            detail += f" via {claimed.provider}: {accepted_by}'s circuit is open (failover)"
            log.warning(
                "message failed over",
                extra={"message_id": str(message_id), "from": accepted_by, "to": claimed.provider},
            )
        session.add(
            MessageEvent(
                message_id=message_id,
                status=MessageStatus.SENDING.value,
                applied=True,
                source="worker",
                detail=detail,
            )
        )
        return claimed


async def _finish_unsent(
    session: AsyncSession,
    message: Message,
    status: MessageStatus,
    reason: str,
    *,
    error_code: str | None = None,
) -> Outcome:
    done = await session.scalar(
        update(Message)
        .where(Message.id == message.id, Message.status == MessageStatus.QUEUED.value)
        .values(status=status.value, error_code=error_code or status.value, error_message=reason)
        .returning(Message.id)
    )
    if done is not None:
        count_status(status.value, message.provider, message.from_)
        session.add(
            MessageEvent(
                message_id=message.id,
                status=status.value,
                applied=True,
                source="worker",
                error_code=error_code,
                detail=reason,
            )
        )
        await emit_message_status(session, message.id)
    return Outcome(status if done is not None else None, events=scheduled(session))


async def _record_failure(
    session_factory: SessionFactory, message: Message, error: ProviderError, policy: RetryPolicy
) -> Outcome:
    """Retry later, fail for good, or leave an unknown outcome for reconciliation."""
    log.warning(
        "provider submission failed",
        extra={
            "message_id": str(message.id),
            "kind": error.kind.value,
            "code": error.code,
            "detail": error.detail,
        },
    )
    async with session_factory.begin() as session:
        if error.recipient_opted_out:
            await record_provider_opt_out(
                session,
                phone=message.to,
                sender_id=message.sender_id,
                provider=message.provider,
                code=error.code,
                detail=error.detail,
            )
        if error.kind is ErrorKind.RETRYABLE and message.attempts < policy.max_attempts:
            retry_in = policy.delay(message.attempts, error.retry_after)
            if error.throttled:
                RATE_LIMIT_DEFERRALS.labels(
                    provider=message.provider, reason="provider_throttled"
                ).inc()
            released = await session.scalar(
                update(Message)
                .where(
                    Message.id == message.id,
                    Message.status == MessageStatus.SENDING.value,
                    Message.attempts == message.attempts,
                )
                .values(
                    status=MessageStatus.QUEUED.value,
                    next_attempt_at=datetime.now(UTC) + timedelta(seconds=retry_in),
                    error_code=error.code,
                    error_message=error.detail,
                )
                .returning(Message.id)
            )
            session.add(
                MessageEvent(
                    message_id=message.id,
                    status=MessageStatus.QUEUED.value,
                    applied=released is not None,
                    source="worker",
                    error_code=error.code,
                    detail=f"retry in {retry_in:.1f}s after: {error.detail}",
                )
            )
            return Outcome(
                MessageStatus.QUEUED,
                retry_in=retry_in if released else None,
                events=scheduled(session),
            )
        if error.kind is ErrorKind.UNKNOWN_OUTCOME:
            # The provider may have the message: resending could text the customer twice.
            # It stays `sending` until a status report (or reconciliation) settles it.
            session.add(
                MessageEvent(
                    message_id=message.id,
                    status=None,
                    applied=False,
                    source="worker",
                    error_code=error.code,
                    detail=f"outcome unknown: {error.detail}",
                )
            )
            return Outcome(MessageStatus.SENDING, events=scheduled(session))
        detail = error.detail
        if error.kind is ErrorKind.RETRYABLE:
            detail = f"gave up after {message.attempts} attempts: {detail}"
        failed: uuid.UUID | None = await session.scalar(
            update(Message)
            .where(
                Message.id == message.id,
                Message.status == MessageStatus.SENDING.value,
                Message.attempts == message.attempts,
            )
            .values(
                status=MessageStatus.FAILED.value,
                error_code=error.code or error.kind.value,
                error_message=detail,
            )
            .returning(Message.id)
        )
        if failed is not None:
            count_status(MessageStatus.FAILED.value, message.provider, message.from_)
        session.add(
            MessageEvent(
                message_id=message.id,
                status=MessageStatus.FAILED.value,
                applied=failed is not None,
                source="worker",
                error_code=error.code,
                detail=detail,
            )
        )
        if failed is not None:
            await emit_message_status(session, message.id)
        return Outcome(MessageStatus.FAILED, events=scheduled(session))


def _remaining_validity(message: Message) -> int | None:
    if message.expires_at is None:
        return None
    return max(1, int((message.expires_at - datetime.now(UTC)).total_seconds()))
