"""Delivering queued messages: one road for a job of one message or of many.

1. **Claim** (one statement, `transitions.claim_messages`): the recipients' locks, the opt-out
   check, expiry and due time, then the conditional UPDATE queued -> sending. Only one run gets
   a message, however many jobs carry it; an expired or opted-out message ends here (in a
   transaction of its own).
2. **Gate** (Redis, no transaction open: `Dispatcher.gate`): each provider's circuit and pause
   once, failover to a sender's fallback provider, each sender's slots in one step. A message
   that may not go now is put back (`transitions.release`, in one transaction for the job):
   waiting is never an attempt.
3. **Submit** each message at its slot, concurrently, with no database connection held; the
   circuit breaker hears each answer as it arrives (`submit`).
4. **Record** each result as it arrives: a refusal or error at once (retry, failure, unknown
   outcome), an acceptance with the others that arrived in the same turn of the event loop.

Cancelled (a job timeout, a shutdown past its grace), a message whose provider call had not
started is put back, a call under way is recorded as an unknown outcome (never resent blindly),
and every acceptance already made is recorded before the cancellation goes on.
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

from app.consent.optouts import record_provider_opt_out
from app.db.models import Message
from app.db.session import SessionFactory
from app.delivery.dispatch import Dispatcher, Go, Ticket, Verdict, Wait
from app.delivery.transitions import (
    NOT_DUE_TOLERANCE_SECONDS,
    PASSES_OPT_OUT,
    Acceptance,
    Claim,
    Outcome,
    claim_messages,
    fail,
    note_unknown_outcome,
    record_acceptances,
    release,
    requeue,
    reroute,
    run_transaction,
)
from app.events.outbox import EventJob
from app.kernel.metrics import PROVIDER_REQUEST_SECONDS, RATE_LIMIT_DEFERRALS
from app.kernel.outages import unavailable_dependency
from app.kernel.status import MessageStatus
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
    "DeliveryResult",
    "Outcome",
    "RetryPolicy",
    "Submitted",
    "deliver",
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


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What became of a job's messages: each one's outcome (`retry_in` set when it must run
    again later), and the event deliveries its committed transactions wrote (to enqueue)."""

    outcomes: dict[uuid.UUID, Outcome]
    events: tuple[EventJob, ...]


@dataclass(frozen=True, slots=True)
class Submitted:
    """A claimed message the provider accepted, not yet recorded as `sent`."""

    message: Message
    provider: str
    accepted: Accepted


async def deliver(
    message_ids: Sequence[uuid.UUID],
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    dispatcher: Dispatcher | None = None,
    *,
    budget: float | None = None,
) -> DeliveryResult:
    """Take queued messages through one provider submission each (see the module's steps).
    Without a `dispatcher` (tests) there is no gate: every claimed message goes at once.

    `budget`: seconds from the claim until everything is cancelled (the job timeout; the claims
    of a job that outlives it are what reconciliation takes for a dead worker's)."""
    claimed, claim_events = await claim_messages(session_factory, message_ids)
    outcomes = dict(claimed.outcomes)
    events: list[EventJob] = list(claim_events)
    if not claimed.claimed:
        return DeliveryResult(outcomes, tuple(events))
    run = _Run(session_factory, providers, policy, dispatcher)
    try:
        async with asyncio.timeout(budget):
            outcomes |= await run.submit_all(claimed)
    except BaseException:
        # Cancelled, timed out or failed: a claim whose provider call had not started is put
        # back; calls under way were recorded as unknown outcomes; acceptances are recorded.
        await asyncio.shield(run.undo_unsubmitted(claimed.claimed))
        raise
    events += run.events
    for outcome in outcomes.values():
        events += outcome.events
    if len(message_ids) > 1:
        log.info("batch delivered", extra={"messages": len(message_ids), "submitted": run.calls})
    return DeliveryResult(outcomes, tuple(events))


class _Run:
    """One job's messages after their claim: gate, put back, submit, record."""

    def __init__(
        self,
        session_factory: SessionFactory,
        providers: dict[str, Provider],
        policy: RetryPolicy,
        dispatcher: Dispatcher | None,
    ) -> None:
        self.session_factory = session_factory
        self.providers = providers
        self.policy = policy
        self.dispatcher = dispatcher
        self.recorder = _Recorder(session_factory)
        self.settled: set[uuid.UUID] = set()  # put back, or handed to the provider (or tried)
        self.calls = 0
        self.events: list[EventJob] = []
        self._tasks: dict[uuid.UUID, asyncio.Task[Outcome]] = {}
        self._homes: dict[uuid.UUID, str] = {}  # failed over: the provider to put it back on

    async def submit_all(self, claimed: Claim) -> dict[uuid.UUID, Outcome]:
        """Each claimed message's outcome."""
        outcomes: dict[uuid.UUID, Outcome] = {}
        for message in claimed.claimed:
            if message.provider not in self.providers:
                error = ProviderError(
                    ErrorKind.PERMANENT,
                    f"provider {message.provider!r} is not configured on this worker",
                    code="provider_not_configured",
                )
                self.settled.add(message.id)
                outcomes[message.id] = await asyncio.shield(
                    _record_failure(self.session_factory, message, error, self.policy)
                )
        messages = [m for m in claimed.claimed if m.provider in self.providers]
        verdicts = await _gate(self.dispatcher, claimed, messages)
        going, put_back, put_back_events = await _route(self.session_factory, messages, verdicts)
        self.settled |= put_back.keys()
        outcomes |= put_back
        self.events += put_back_events
        for message, go in going:
            if go.home:
                self._homes[message.id] = go.home
            self._tasks[message.id] = asyncio.create_task(self._submit_at(go, message))
        if self._tasks:
            await asyncio.wait(self._tasks.values())
        for message_id, task in self._tasks.items():
            if (failure := task.exception()) is not None:
                # Its message was recorded as far as it got (an interrupted call as an unknown
                # outcome); the others' outcomes still count.
                if unavailable_dependency(failure) is None:
                    log.error("delivery of a message failed", exc_info=failure)
                else:  # an outage: the job's sweeps and the worker count and report it
                    log.info("delivery of a message stopped by an outage", exc_info=failure)
                outcomes[message_id] = Outcome(None)
            else:
                outcomes[message_id] = task.result()
        self.events += self.recorder.events
        return outcomes

    async def undo_unsubmitted(self, claimed: list[Message]) -> None:
        """After a cancellation: stop the submissions, put back what was never handed to the
        provider, and wait for the acceptances being recorded."""
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks.values())
        for message in claimed:
            if message.id not in self.settled:
                reason = "cancelled before the provider call"
                home = self._homes.get(message.id)
                await release_claim(self.session_factory, message, reason, home)
        await self.recorder.drained()

    async def _submit_at(self, go: Go, message: Message) -> Outcome:
        """Wait for the message's slot, submit it, and record what the provider said."""
        if (delay := go.at - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        if go.in_line and self.dispatcher is not None:
            wait = await self.dispatcher.take_turn(go, message.sender_id, message.id)
            if wait > 0:
                reason = f"the sender's pace; next turn in {wait:.1f}s"
                self.settled.add(message.id)
                await asyncio.shield(
                    release_claim(
                        self.session_factory, message, reason, go.home, quiet=True, retry_in=wait
                    )
                )
                return Outcome(MessageStatus.QUEUED, retry_in=wait)
        self.settled.add(message.id)  # from here on the provider may have it
        self.calls += 1
        provider = self.providers[go.provider]
        submitted = await submit(
            message, provider, self.session_factory, self.policy, self.dispatcher
        )
        if isinstance(submitted, Outcome):
            return submitted
        # The record is queued at once and finished even if the job is cancelled meanwhile; the
        # breaker hears the answer at once, in the order answers arrive.
        recorded = self.recorder.record(submitted)
        try:
            if self.dispatcher is not None:
                await self.dispatcher.record(provider.name, None)
        finally:
            moved = await asyncio.shield(recorded)
        return Outcome(MessageStatus.SENT if moved else None)


async def deliver_message(
    message_id: uuid.UUID,
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    dispatcher: Dispatcher | None = None,
) -> Outcome:
    """`deliver` for a job of one message: its outcome, with every event delivery written."""
    result = await deliver([message_id], session_factory, providers, policy, dispatcher)
    return replace(result.outcomes[message_id], events=result.events)


async def _gate(
    dispatcher: Dispatcher | None, claimed: Claim, messages: list[Message]
) -> dict[uuid.UUID, Verdict]:
    if dispatcher is None or not messages:
        return {m.id: Go(m.provider) for m in messages}
    tickets = []
    for message in messages:
        terms = claimed.senders[message.sender_id]
        fallback = terms.fallback_provider if message.resubmissions == 0 else None
        tickets.append(
            Ticket(message.id, message.provider, message.sender_id, terms.rate, fallback)
        )
    return await dispatcher.gate(tickets)


async def _route(
    session_factory: SessionFactory,
    messages: list[Message],
    verdicts: dict[uuid.UUID, Verdict],
) -> tuple[list[tuple[Message, Go]], dict[uuid.UUID, Outcome], tuple[EventJob, ...]]:
    """Put back the messages that must wait and move the failed-over ones to their fallback,
    in one transaction (none in the common case); the messages to submit, with their verdicts."""
    waiting = [(m, v) for m in messages if isinstance(v := verdicts[m.id], Wait)]
    moving = [(m, v) for m in messages if isinstance(v := verdicts[m.id], Go) and v.home]
    if not waiting and not moving:
        return [(m, v) for m in messages if isinstance(v := verdicts[m.id], Go)], {}, ()

    async def work(session: AsyncSession) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        released = set()
        for message, wait in waiting:
            reason = _reason(wait)
            if await release(
                session, message, reason, message.provider, quiet=True, retry_in=wait.seconds
            ):
                released.add(message.id)
        moved = set()
        for message, go in moving:
            reason = f"{message.provider}'s circuit is open"
            if await reroute(session, message, go.provider, reason):
                moved.add(message.id)
        return released, moved

    (released, moved), events = await run_transaction(session_factory, work)
    outcomes = {
        m.id: Outcome(MessageStatus.QUEUED, retry_in=w.seconds if m.id in released else None)
        for m, w in waiting
    }
    going = []
    for message in messages:
        verdict = verdicts[message.id]
        if not isinstance(verdict, Go):
            continue
        if verdict.home and message.id not in moved:
            outcomes[message.id] = Outcome(None)  # it moved on meanwhile (a report, a sweep)
            continue
        if verdict.home:
            message.provider = verdict.provider
        going.append((message, verdict))
    return going, outcomes, events


def _reason(wait: Wait) -> str:
    if wait.reason == "sender_rate":
        return f"the sender's pace; next turn in {wait.seconds:.1f}s"
    return f"{wait.reason.replace('_', ' ')}; again in {wait.seconds:.1f}s"


class _Recorder:
    """Records acceptances as they arrive, one transaction at a time (`transitions.mark_sent`):
    an acceptance waits for no other, but those that arrive while a record is being written
    share the next one, so a busy job writes few transactions and an idle one no later."""

    def __init__(self, session_factory: SessionFactory) -> None:
        self._session_factory = session_factory
        self._pending: list[tuple[Submitted, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.events: list[EventJob] = []

    def record(self, submitted: Submitted) -> asyncio.Future[bool]:
        """Whether the message moved to `sent` (not when a report or later attempt owns it)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((submitted, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return done

    async def drained(self) -> None:
        """Wait for every record under way."""
        if self._writer is not None:
            await asyncio.wait({self._writer})

    async def _write(self) -> None:
        batch: list[tuple[Submitted, asyncio.Future[bool]]] = []
        try:
            while self._pending:
                await asyncio.sleep(0)  # the rest of this turn's acceptances join
                batch, self._pending = self._pending, []
                try:
                    moved, events = await record_submissions(
                        self._session_factory, [s for s, _ in batch]
                    )
                except Exception as error:
                    for _, done in batch:
                        done.set_exception(error)
                    continue
                self.events += events
                for submitted, done in batch:
                    done.set_result(submitted.message.id in moved)
        finally:
            self._writer = None
            for _, done in batch + self._pending:  # cancelled: nothing may wait forever
                if not done.done():
                    done.cancel()


async def submit(
    message: Message,
    provider: Provider,
    session_factory: SessionFactory,
    policy: RetryPolicy,
    dispatcher: Dispatcher | None,
) -> Submitted | Outcome:
    """Call the provider for a claimed message. A refusal or error is recorded here (retry,
    failure or unknown outcome) and told to the circuit breaker; an acceptance is returned for
    the caller to record and tell the breaker of (each answer reaches the breaker as it arrives,
    so a success resets the failures before it)."""
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
        # The record starts now and is finished even if the job is cancelled meanwhile; the
        # breaker hears the answer at once, in the order answers arrive.
        recording = asyncio.ensure_future(_record_failure(session_factory, message, error, policy))
        try:
            if dispatcher is not None:
                await dispatcher.record(provider.name, error)
        finally:
            outcome = await asyncio.shield(recording)
        return outcome
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
    """Record that the provider accepted these messages (`transitions.record_acceptances`): the
    ids that moved to `sent`, and the event deliveries written."""
    accepted = [
        Acceptance(s.message, s.provider, s.accepted.provider_message_id, s.accepted.part_ids)
        for s in submitted
    ]
    return await record_acceptances(session_factory, accepted)


def _observe(provider: str, outcome: str, started: float) -> None:
    PROVIDER_REQUEST_SECONDS.labels(provider=provider, outcome=outcome).observe(
        time.perf_counter() - started
    )


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
    session_factory: SessionFactory,
    message: Message,
    reason: str,
    home: str | None = None,
    *,
    quiet: bool = False,
    retry_in: float | None = None,
) -> None:
    """Undo a claim before the provider was called: back to `queued` on its own provider
    (`home`, when it had failed over), the attempt not counted (`transitions.release`)."""

    async def work(session: AsyncSession) -> bool:
        return await release(
            session, message, reason, home or message.provider, quiet=quiet, retry_in=retry_in
        )

    await run_transaction(session_factory, work)


def _remaining_validity(message: Message) -> int | None:
    if message.expires_at is None:
        return None
    return max(1, int((message.expires_at - datetime.now(UTC)).total_seconds()))
