"""Reading and listing messages (accepting them: app.sending.accept; status reports and every
other change of state: app.delivery.transitions)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal
from app.db.models import Message, MessageEvent
from app.delivery.transitions import cancel_message
from app.kernel.errors import Conflict, NotFound
from app.kernel.pagination import as_utc, decode_cursor, encode_cursor
from app.kernel.status import MessageStatus

log = logging.getLogger(__name__)


async def get_message(
    session: AsyncSession, principal: Principal, message_id: uuid.UUID
) -> tuple[Message, list[MessageEvent]]:
    """A message and everything recorded about it, oldest first: the transitions that took
    effect and the notes (decisions that changed no status, reports that changed nothing).

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
        select(MessageEvent).where(MessageEvent.message_id == message_id).order_by(MessageEvent.id)
    )
    return message, list(history)


async def cancel(session: AsyncSession, principal: Principal, message_id: uuid.UUID) -> Message:
    """Cancel a client's (an admin: any) scheduled, held or queued message in the session's
    transaction (the request's: it commits before the answer); the message as it is now.
    `Conflict` (`already_<status>`) when a delivery attempt took it first."""
    client_id = None if principal.is_admin else principal.client_id
    outcome = await cancel_message(session, message_id, client_id)
    if outcome.status is not MessageStatus.CANCELED:
        raise Conflict(
            f"already_{outcome.status.value}",
            f"the message is already {outcome.status.value}: only a scheduled, held "
            "or queued message can be canceled",
        )
    message = await session.get(Message, message_id, populate_existing=True)
    assert message is not None
    return message


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Filters for listing messages; all optional."""

    to: str | None = None
    from_: str | None = None
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
    if filters.from_ is not None:
        query = query.where(Message.from_ == filters.from_)
    if filters.status is not None:
        query = query.where(Message.status == filters.status.value)
    if filters.created_after is not None:
        query = query.where(Message.created_at >= as_utc(filters.created_after, "created_after"))
    if filters.created_before is not None:
        query = query.where(Message.created_at < as_utc(filters.created_before, "created_before"))
    if cursor is not None:
        created_at, message_id = decode_cursor(cursor, uuid.UUID)
        # A row comparison: the index's own order, so a deep page starts where the cursor is.
        query = query.where(tuple_(Message.created_at, Message.id) < tuple_(created_at, message_id))
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
