"""Accepting, reading and listing messages, and applying status reports to them."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessageEvent
from app.domain.auth import Principal
from app.domain.encoding import BodyAnalysis, analyze_body
from app.domain.optouts import is_opted_out
from app.domain.senders import resolve_sender
from app.domain.status import MessageStatus, can_advance, statuses_before
from app.errors import NotFound, PolicyRefusal, ValidationFailed
from app.providers.base import StatusReport

# Session.info key holding ids of messages to enqueue once the transaction has committed.
ENQUEUE_AFTER_COMMIT = "enqueue_after_commit"


@dataclass(frozen=True, slots=True)
class SendCommand:
    """A validated request to send one message (`to` is already E.164)."""

    to: str
    body: str
    sender: str | None = None
    callback_url: str | None = None
    validity_period: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def check_body(body: str, max_segments: int) -> BodyAnalysis:
    """Measure a body and enforce the segment limit."""
    analysis = analyze_body(body)
    if analysis.segments > max_segments:
        raise ValidationFailed.for_field(
            "too_many_segments",
            "body",
            f"needs {analysis.segments} {analysis.encoding} segments; the limit is {max_segments}",
        )
    return analysis


async def accept_message(
    session: AsyncSession,
    principal: Principal,
    command: SendCommand,
    *,
    max_segments: int,
    default_region: str,
) -> Message:
    """Store a new message as `queued` and schedule its delivery after commit."""
    analysis = check_body(command.body, max_segments)
    sender = await resolve_sender(
        session, command.sender, principal.default_sender_id, default_region
    )
    if await is_opted_out(session, command.to, sender.id):
        raise PolicyRefusal(
            "recipient_opted_out", f"{command.to} has opted out of messages from {sender.address}"
        )
    now = datetime.now(UTC)
    message = Message(
        id=uuid.uuid4(),
        client_id=principal.client_id,
        sender_id=sender.id,
        to=command.to,
        from_=sender.address,
        body=command.body,
        encoding=analysis.encoding.value,
        segments=analysis.segments,
        status=MessageStatus.QUEUED.value,
        provider=sender.provider,
        callback_url=command.callback_url,
        metadata_=command.metadata,
        validity_period=command.validity_period,
        expires_at=(
            now + timedelta(seconds=command.validity_period) if command.validity_period else None
        ),
        attempts=0,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
    )
    session.add(message)
    session.add(
        MessageEvent(
            message_id=message.id, status=message.status, applied=True, source="api", created_at=now
        )
    )
    await session.flush()
    session.info.setdefault(ENQUEUE_AFTER_COMMIT, []).append(message.id)
    return message


async def get_message(
    session: AsyncSession, client_id: uuid.UUID, message_id: uuid.UUID
) -> tuple[Message, list[MessageEvent]]:
    """A client's message and its status history (the transitions that took effect)."""
    message = await session.scalar(
        select(Message).where(Message.id == message_id, Message.client_id == client_id)
    )
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


def encode_cursor(message: Message) -> str:
    """An opaque cursor pointing just past `message` in newest-first order."""
    raw = f"{message.created_at.isoformat()}|{message.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor points at, or `ValidationFailed` naming `cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, message_id = raw.partition("|")
        position = datetime.fromisoformat(created_at)
        if position.tzinfo is None:
            raise ValueError("cursors carry a UTC offset")
        # Converting here turns an edited, out-of-range timestamp into a 422 instead of a
        # database error.
        return position.astimezone(UTC), uuid.UUID(message_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise ValidationFailed.for_field(
            "invalid_cursor", "cursor", "not a cursor returned by this API"
        ) from None


def _as_utc(value: datetime, field: str) -> datetime:
    # The driver converts to UTC too, but a value near datetime's limits (year 1 at +14:00)
    # overflows there as an unhandled database error; report it as the client's mistake.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed.for_field(
            "validation_error", field, "out of range once converted to UTC"
        ) from None


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
        query = query.where(Message.created_at >= _as_utc(filters.created_after, "created_after"))
    if filters.created_before is not None:
        query = query.where(Message.created_at < _as_utc(filters.created_before, "created_before"))
    if cursor is not None:
        created_at, message_id = decode_cursor(cursor)
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
    return Page(items=items, next_cursor=encode_cursor(items[-1]) if has_more else None)


async def apply_status_report(session: AsyncSession, provider: str, report: StatusReport) -> bool:
    """Record a provider's report and move the message forward if it is news.

    Returns False when no message matches (the caller still acknowledges it). Duplicated and
    late reports are stored as events with `applied` false and change nothing: the conditional
    UPDATE only matches while the message is at an earlier stage, which also makes concurrent
    reports for the same message safe.
    """
    message = await _find_reported_message(session, provider, report)
    if message is None:
        return False
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
    return True


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
