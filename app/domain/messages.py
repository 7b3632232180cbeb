"""Reading and listing messages, and applying status reports to them (accepting them is
`app.domain.accept`'s)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessageEvent
from app.domain.auth import Principal
from app.domain.events import emit_message_statuses
from app.domain.optouts import record_provider_opt_out
from app.domain.pagination import as_utc, decode_cursor, encode_cursor
from app.domain.status import MessageStatus, can_advance, statuses_before
from app.domain.text import storable, storable_mapping
from app.errors import NotFound
from app.logs import message_id_var
from app.metrics import count_status
from app.providers.base import StatusReport

log = logging.getLogger(__name__)

# Session.info key holding ids of messages to enqueue once the transaction has committed.
ENQUEUE_AFTER_COMMIT = "enqueue_after_commit"
# Session.info key holding callables to run once the transaction has committed (forgetting
# cached copies of what it changed: forgotten earlier, a concurrent request could cache the old).
AFTER_COMMIT = "after_commit"


async def get_message(
    session: AsyncSession, principal: Principal, message_id: uuid.UUID
) -> tuple[Message, list[MessageEvent]]:
    """A message and its status history (the transitions that took effect).

    Clients see their own messages; admin keys see every message, including the service's own
    keyword replies.
    """
    query = select(Message).where(Message.id == message_id)
    if not principal.is_admin:
        query = query.where(Message.client_id == principal.client_id)
    message = await session.scalar(query)
    if message is None:
        raise NotFound("message_not_found", f"no message with id {message_id}")
    history = await session.scalars(
        select(MessageEvent)
        .where(MessageEvent.message_id == message_id, MessageEvent.applied.is_(True))
        .order_by(MessageEvent.id)
    )
    return message, list(history)


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Filters for listing messages; all optional."""

    to: str | None = None
    status: MessageStatus | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a cursor-paginated listing, newest first."""

    items: list[Message]
    next_cursor: str | None


async def list_messages(
    session: AsyncSession,
    client_id: uuid.UUID,
    filters: MessageFilter,
    *,
    limit: int,
    cursor: str | None,
) -> Page:
    """A page of a client's messages, newest first, after `cursor` if given."""
    query = select(Message).where(Message.client_id == client_id)
    if filters.to is not None:
        query = query.where(Message.to == filters.to)
    if filters.status is not None:
        query = query.where(Message.status == filters.status.value)
    if filters.created_after is not None:
        query = query.where(Message.created_at >= as_utc(filters.created_after, "created_after"))
    if filters.created_before is not None:
        query = query.where(Message.created_at < as_utc(filters.created_before, "created_before"))
    if cursor is not None:
        created_at, message_id = decode_cursor(cursor, uuid.UUID)
        query = query.where(
            or_(
                Message.created_at < created_at,
                and_(Message.created_at == created_at, Message.id < message_id),
            )
        )
    rows = list(
        await session.scalars(
            query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit + 1)
        )
    )
    has_more = len(rows) > limit
    items = rows[:limit]
    return Page(
        items=items,
        next_cursor=encode_cursor(items[-1].created_at, items[-1].id) if has_more else None,
    )


async def apply_status_report(session: AsyncSession, provider: str, report: StatusReport) -> bool:
    """Record a provider's report and move the message forward if it is news.

    Returns False when no message matches (the caller still acknowledges it). Duplicated and
    late reports are stored as events with `applied` false and change nothing: the conditional
    UPDATE only matches while the message is at an earlier stage, which also makes concurrent
    reports for the same message safe.
    """
    report = _storable_report(report)
    message = await _find_reported_message(session, provider, report)
    if message is None:
        return False
    message_id_var.set(str(message.id))  # the rest of this request's log lines are about it
    applied = False
    if report.status is not None and can_advance(MessageStatus(message.status), report.status):
        values: dict[str, Any] = {"status": report.status.value}
        if report.error_code is not None:
            values |= {"error_code": report.error_code, "error_message": report.error_message}
        result = await session.execute(
            update(Message)
            .where(
                Message.id == message.id,
                Message.status.in_([s.value for s in statuses_before(report.status)]),
            )
            .values(**values)
            .returning(Message.id)
        )
        applied = result.scalar_one_or_none() is not None
        if applied:
            count_status(report.status.value, provider, message.from_)
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
