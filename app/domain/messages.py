"""Accepting, reading and listing messages (status reports: app.domain.transitions)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Insert, and_, insert, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessageEvent, Sender
from app.domain.auth import Principal
from app.domain.encoding import BodyAnalysis, analyze_body
from app.domain.keywords import KeywordConfig, missing_replies
from app.domain.optouts import is_opted_out
from app.domain.pagination import as_utc, decode_cursor, encode_cursor
from app.domain.senders import resolve_sender
from app.domain.status import MessageStatus
from app.errors import NotFound, PolicyRefusal, ValidationFailed
from app.metrics import count_status

log = logging.getLogger(__name__)

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
    accept_default_replies: bool,
) -> Message:
    """Store a new message as `queued` and schedule its delivery after commit."""
    analysis = check_body(command.body, max_segments)
    sender = await resolve_sender(
        session, command.sender, principal.default_sender_id, default_region
    )
    missing = missing_replies(
        KeywordConfig.model_validate(sender.keywords), accept_defaults=accept_default_replies
    )
    if missing:
        raise PolicyRefusal(
            "sender_keywords_incomplete",
            f"sender {sender.address} cannot send until its keyword replies are configured; "
            f"missing: {', '.join(missing)}",
        )
    if await is_opted_out(session, command.to, sender.id):
        raise PolicyRefusal(
            "recipient_opted_out", f"{command.to} has opted out of messages from {sender.address}"
        )
    return await queue_message(
        session,
        client_id=principal.client_id,
        sender=sender,
        to=command.to,
        body=command.body,
        analysis=analysis,
        callback_url=command.callback_url,
        metadata=command.metadata,
        validity_period=command.validity_period,
    )


async def queue_message(
    session: AsyncSession,
    *,
    client_id: uuid.UUID | None,
    sender: Sender,
    to: str,
    body: str,
    analysis: BodyAnalysis,
    kind: str = "regular",
    source: str = "api",
    callback_url: str | None = None,
    metadata: dict[str, str] | None = None,
    validity_period: int | None = None,
) -> Message:
    """Insert a `queued` message and its first history event; it is enqueued after commit.

    Checks are the caller's: clients' messages go through `accept_message`, the service's own
    keyword replies through `app.domain.inbound`.
    """
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "client_id": client_id,
        "sender_id": sender.id,
        "kind": kind,
        "to": to,
        "from_": sender.address,
        "body": body,
        "encoding": analysis.encoding.value,
        "segments": analysis.segments,
        "status": MessageStatus.QUEUED.value,
        "provider": sender.provider,
        "callback_url": callback_url,
        "metadata_": metadata or {},
        "validity_period": validity_period,
        "expires_at": now + timedelta(seconds=validity_period) if validity_period else None,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": now,
    }
    # The message and its first history row in one statement (one round trip, no unit of work);
    # the other columns take their defaults. The object is for the caller and the response: it is
    # not added to the session.
    message = Message(**values)
    inserted = (
        insert(Message)
        .values({getattr(Message, key): value for key, value in values.items()})
        .returning(Message.id)
        .cte("inserted")
    )
    await session.execute(
        first_history_rows(inserted.c.id, source=source, at=literal(now, DateTime(timezone=True)))
    )
    session.info.setdefault(ENQUEUE_AFTER_COMMIT, []).append(message.id)
    count_status(MessageStatus.QUEUED.value, sender.provider, sender.address)
    log.info("message accepted", extra={"message_id": str(message.id), "kind": kind})
    return message


def first_history_rows(
    message_id: ColumnElement[uuid.UUID], *, source: str, at: ColumnElement[datetime]
) -> Insert:
    """An INSERT of the `queued` history row of each message `message_id` selects (a column of
    an INSERT … RETURNING, or of a list of ids): the row every accepted message starts with."""
    return insert(MessageEvent).from_select(
        [
            MessageEvent.message_id,
            MessageEvent.status,
            MessageEvent.applied,
            MessageEvent.source,
            MessageEvent.created_at,
        ],
        select(message_id, literal(MessageStatus.QUEUED.value), literal(True), literal(source), at),
    )


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
