"""The changes of a message's state that follow its acceptance, and how their transactions run.

Every change here is conditional (it matches only while the message is where the change expects
it, so duplicates and races are harmless) and takes its locks in the one order used everywhere:
the recipient's advisory lock (app.domain.optouts.lock_recipients) first, then the message row.
Timestamps come from the database's clock.

`run_transaction` runs a whole unit of work in a fresh transaction and runs it again, a bounded
number of times, when PostgreSQL aborts it for a deadlock (40P01) or a serialization failure
(40001): such an abort is about timing, not about the work, and the caller (a provider's status
callback, which is never sent again; a worker's record of a provider's answer) has nobody to
pass it on to.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Final, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.domain.events import EventJob, emit_message_statuses, scheduled
from app.domain.optouts import lock_recipients, record_provider_opt_out
from app.domain.status import MessageStatus, can_advance, statuses_before
from app.domain.text import storable, storable_mapping
from app.logs import message_id_var
from app.metrics import count_status
from app.providers.base import StatusReport

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the same transaction, run again, may well succeed.
RETRYABLE_SQLSTATES: Final = frozenset({"40P01", "40001"})  # deadlock, serialization failure
# How many times a unit of work runs at most; between runs a short random pause (seconds, times
# the run's number) lets the transaction that won finish first.
TRANSACTION_ATTEMPTS: Final = 5
RETRY_PAUSE_SECONDS: Final = 0.02


def is_retryable(error: BaseException) -> bool:
    """Whether PostgreSQL aborted the transaction for its timing (deadlock, serialization)."""
    if not isinstance(error, DBAPIError):
        return False
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    return sqlstate in RETRYABLE_SQLSTATES


async def run_transaction(
    session_factory: SessionFactory,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = TRANSACTION_ATTEMPTS,
) -> tuple[T, tuple[EventJob, ...]]:
    """Run `work` in a transaction and commit; run it again in a new one after a deadlock or a
    serialization failure (at most `attempts` runs). Returns its result and the event deliveries
    the committed transaction scheduled (to enqueue after the commit)."""
    for attempt in range(1, attempts + 1):
        try:
            async with session_factory.begin() as session:
                result = await work(session)
        except DBAPIError as error:
            if attempt == attempts or not is_retryable(error):
                raise
            log.warning(
                "transaction aborted by the database; running it again",
                extra={"attempt": attempt, "error": str(error.orig)[:200]},
            )
            await asyncio.sleep(random.uniform(0.5, 1.0) * RETRY_PAUSE_SECONDS * attempt)
            continue
        return result, scheduled(session)
    raise AssertionError("unreachable")  # the last attempt returns or raises


async def apply_status_report(session: AsyncSession, provider: str, report: StatusReport) -> bool:
    """Record a provider's report and move the message forward if it is news.

    Returns False when no message matches (the caller still acknowledges it). Duplicated and
    late reports are stored as events with `applied` false and change nothing: the conditional
    UPDATE only matches while the message is at an earlier stage, which also makes concurrent
    reports for the same message safe. A report that the recipient opted out takes the
    recipient's lock before it touches the message row, as a claim does.
    """
    report = _storable_report(report)
    message = await _find_reported_message(session, provider, report)
    if message is None:
        return False
    message_id_var.set(str(message.id))  # the rest of this request's log lines are about it
    if report.recipient_opted_out:
        # Before the row: a claim holds this lock while it updates the row (one lock order).
        await lock_recipients(session, [message.to])
    applied = await _advance(session, provider, message, report)
    if report.recipient_opted_out:
        await record_provider_opt_out(
            session,
            phone=message.to,
            sender_id=message.sender_id,
            provider=provider,
            code=report.error_code,
            detail=report.error_message,
        )
    if message.provider_message_id is None:
        # The report may beat the worker's own record of the provider's id.
        await session.execute(
            update(Message)
            .where(Message.id == message.id, Message.provider_message_id.is_(None))
            .values(provider_message_id=report.provider_message_id)
        )
    session.add(
        MessageEvent(
            message_id=message.id,
            status=report.status.value if report.status else None,
            applied=applied,
            source=provider,
            provider_status=report.provider_status,
            error_code=report.error_code,
            detail=report.error_message,
            payload=dict(report.raw),
        )
    )
    await session.flush()
    if applied:
        await emit_message_statuses(session, [message])  # events out (after commit)
    return True


async def record_status_report(
    session_factory: SessionFactory, provider: str, report: StatusReport
) -> tuple[bool, tuple[EventJob, ...]]:
    """`apply_status_report` in a transaction of its own, run again after a deadlock: a status
    callback answered 500 is not sent again by Twilio. Returns whether a message matched, and
    the event deliveries to enqueue."""

    async def work(session: AsyncSession) -> bool:
        return await apply_status_report(session, provider, report)

    return await run_transaction(session_factory, work)


async def _advance(
    session: AsyncSession, provider: str, message: Message, report: StatusReport
) -> bool:
    """Move the message to the report's status if that is forward; whether it moved."""
    if report.status is None or not can_advance(MessageStatus(message.status), report.status):
        return False
    values: dict[str, Any] = {"status": report.status.value}
    if report.error_code is not None:
        values |= {"error_code": report.error_code, "error_message": report.error_message}
    moved = await session.scalar(
        update(Message)
        .where(
            Message.id == message.id,
            Message.status.in_([s.value for s in statuses_before(report.status)]),
        )
        .values(**values)
        .returning(Message.id)
    )
    if moved is not None:
        count_status(report.status.value, provider, message.from_)
    return moved is not None


def _storable_report(report: StatusReport) -> StatusReport:
    """The report cut to our columns' sizes and without NUL: a report is recorded, never
    refused for its shape (the provider would retry it forever)."""
    return replace(
        report,
        provider_message_id=storable(report.provider_message_id)[:64],
        provider_status=storable(report.provider_status)[:32],
        error_code=storable(report.error_code)[:32] if report.error_code else None,
        error_message=storable(report.error_message) if report.error_message else None,
        raw=storable_mapping(report.raw),
    )


async def _find_reported_message(
    session: AsyncSession, provider: str, report: StatusReport
) -> Message | None:
    if report.message_id is not None:
        message = await session.get(Message, report.message_id, populate_existing=True)
        if message is not None and message.provider == provider:
            return message
    return await session.scalar(
        select(Message).where(
            Message.provider == provider,
            Message.provider_message_id == report.provider_message_id,
        )
    )
