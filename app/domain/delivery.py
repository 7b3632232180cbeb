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
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message
from app.db.session import SessionFactory
from app.domain.dispatch import Dispatcher, Go, Wait
from app.domain.events import EventJob
from app.domain.optouts import record_provider_opt_out
from app.domain.status import MessageStatus
from app.domain.transitions import (
    NOT_DUE_TOLERANCE_SECONDS,
    PASSES_OPT_OUT,
    Acceptance,
    Claim,
    Outcome,
    claim,
    fail,
    mark_sent,
    note_unknown_outcome,
    release,
    requeue,
    run_transaction,
)
from app.metrics import PROVIDER_REQUEST_SECONDS, RATE_LIMIT_DEFERRALS
from app.providers.base import (
    Accepted,
    Encoding,
    ErrorKind,
    OutboundSms,
    Provider,
    ProviderError,
)

log = logging.getLogger(__name__)

__all__ = [  # the claim's rules and a run's outcome live with the other state changes
    "NOT_DUE_TOLERANCE_SECONDS",
    "PASSES_OPT_OUT",
    "Outcome",
    "RetryPolicy",
    "Submitted",
    "deliver_message",
    "record_submissions",
    "submit",
]


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
                release_claim(session_factory, message, "cancelled before the provider call", route)
            )
            raise
        if wait > 0:
            await release_claim(
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
    """Record that the provider accepted these messages, in one transaction
    (`transitions.mark_sent`): the ids that moved to `sent`, and the event deliveries written."""
    if not submitted:
        return set(), ()
    accepted = [
        Acceptance(s.message, s.provider, s.accepted.provider_message_id) for s in submitted
    ]

    async def work(session: AsyncSession) -> set[uuid.UUID]:
        return await mark_sent(session, accepted)

    return await run_transaction(session_factory, work)


def _observe(provider: str, outcome: str, started: float) -> None:
    PROVIDER_REQUEST_SECONDS.labels(provider=provider, outcome=outcome).observe(
        time.perf_counter() - started
    )


async def _claim(
    session_factory: SessionFactory, message_id: uuid.UUID, route: Go | None = None
) -> Message | Outcome:
    """Claim the message through the one claim of every delivery (app.domain.transitions), or
    say why there is nothing to send now. With a `route` to another provider (failover), the
    message moves to that provider as it is claimed."""
    routes = {message_id: route.provider} if route is not None else None

    async def work(session: AsyncSession) -> Claim:
        return await claim(session, [message_id], routes)

    claimed, events = await run_transaction(session_factory, work)
    if claimed.claimed:
        return claimed.claimed[0]
    return replace(claimed.outcomes[message_id], events=events)


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
    retry_in: float | None = None
    if error.kind is ErrorKind.RETRYABLE and message.attempts < policy.max_attempts:
        retry_in = policy.delay(message.attempts, error.retry_after)
        if error.throttled:
            RATE_LIMIT_DEFERRALS.labels(
                provider=message.provider, reason="provider_throttled"
            ).inc()

    async def work(session: AsyncSession) -> Outcome:
        if error.recipient_opted_out:  # the recipient's lock before the message row
            await record_provider_opt_out(
                session,
                phone=message.to,
                sender_id=message.sender_id,
                provider=message.provider,
                code=error.code,
                detail=error.detail,
            )
        if retry_in is not None:
            requeued = await requeue(session, message, retry_in, error.code, error.detail)
            return Outcome(MessageStatus.QUEUED, retry_in=retry_in if requeued else None)
        if error.kind is ErrorKind.UNKNOWN_OUTCOME:
            # The provider may have the message: resending could text the customer twice.
            note_unknown_outcome(session, message, error.code, error.detail)
            return Outcome(MessageStatus.SENDING)
        detail = error.detail
        if error.kind is ErrorKind.RETRYABLE:
            detail = f"gave up after {message.attempts} attempts: {detail}"
        await fail(
            session,
            message,
            error_code=error.code or error.kind.value,
            detail=detail,
            event_code=error.code,
        )
        return Outcome(MessageStatus.FAILED)

    outcome, events = await run_transaction(session_factory, work)
    return replace(outcome, events=events)


async def release_claim(
    session_factory: SessionFactory, message: Message, reason: str, route: Go
) -> None:
    """Undo a claim before the provider was called (its turn has passed, or the job was
    cancelled): back to `queued` on its own provider, the attempt not counted."""

    async def work(session: AsyncSession) -> bool:
        return await release(session, message, reason, route.home or message.provider)

    await run_transaction(session_factory, work)


def _remaining_validity(message: Message) -> int | None:
    if message.expires_at is None:
        return None
    return max(1, int((message.expires_at - datetime.now(UTC)).total_seconds()))
