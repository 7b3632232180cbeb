"""A number's conversation with one sender: what we sent it and what it sent us, interleaved in
time, with keyword matches and our replies to them marked.

Bodies stay hidden unless the caller asks for them (the console logs who did), except our own
keyword replies, which are the sender's configured text, and the keyword an inbound message
matched (STOP is what an operator looks for, not a secret).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import Select, case, null, select, true, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, InboundMessage, Message

# One page of a conversation; older turns are one cursor away.
PAGE_LIMIT: Final = 50
MAX_PAGE_LIMIT: Final = 200
REGULAR_KIND: Final = "regular"


class Direction(StrEnum):
    """Who wrote a turn of the conversation."""

    OUTBOUND = "outbound"  # we (a client, or our keyword reply) wrote to the number
    INBOUND = "inbound"  # the number wrote to the sender


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the conversation."""

    id: uuid.UUID
    at: datetime
    direction: Direction
    kind: str  # outbound: regular or a keyword reply kind; inbound: "inbound"
    status: str | None  # outbound only
    body: str | None  # None: hidden
    keyword: str | None  # inbound: the keyword it matched, normalised
    keyword_category: str | None  # opt_out, opt_in, help, custom
    reply_id: uuid.UUID | None  # inbound: our reply to it, if one was sent
    segments: int | None

    @property
    def is_reply(self) -> bool:
        """Our own answer to a keyword (not a client's message)."""
        return self.direction is Direction.OUTBOUND and self.kind != REGULAR_KIND


@dataclass(frozen=True, slots=True)
class Conversation:
    """Turns oldest first; `older` is the cursor of the page before it (None: the start)."""

    phone: str
    sender_id: uuid.UUID
    turns: list[Turn]
    older: tuple[datetime, uuid.UUID] | None


async def conversation(
    session: AsyncSession,
    phone: str,
    sender_id: uuid.UUID,
    *,
    before: tuple[datetime, uuid.UUID] | None = None,
    limit: int = PAGE_LIMIT,
    show_bodies: bool = False,
) -> Conversation:
    """The newest `limit` turns between `phone` (E.164) and a sender, before the (time, id)
    cursor `before`, returned oldest first. Each side is read newest first through an index on
    its number (`ix_messages_client_to_created` per client and for our replies,
    `ix_inbound_from_created`), at most `limit + 1` rows each."""
    limit = max(1, min(limit, MAX_PAGE_LIMIT))
    outbound = await _outbound(session, phone, sender_id, before, limit + 1, show_bodies)
    inbound = await _inbound(session, phone, sender_id, before, limit + 1, show_bodies)
    merged = sorted([*outbound, *inbound], key=lambda turn: (turn.at, turn.id), reverse=True)
    page = merged[:limit]
    older = (page[-1].at, page[-1].id) if len(merged) > limit else None
    return Conversation(phone=phone, sender_id=sender_id, turns=page[::-1], older=older)


def _sent(
    phone: str, sender_id: uuid.UUID, before: tuple[datetime, uuid.UUID] | None, limit: int
) -> Select[uuid.UUID, datetime, str, str, str | None, int]:
    """The newest `limit` messages to `phone` from the sender of one client (compared by the
    caller), newest first: one range scan of `ix_messages_client_to_created`, stopping after
    `limit`. A body is read only where it may be shown without asking: our keyword replies."""
    query = select(
        Message.id,
        Message.created_at,
        Message.kind,
        Message.status,
        case((Message.kind != REGULAR_KIND, Message.body), else_=null()).label("body"),
        Message.segments,
    ).where(Message.to == phone, Message.sender_id == sender_id)
    if before is not None:
        query = query.where(tuple_(Message.created_at, Message.id) < tuple_(*before))
    return query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)


def outbound_statement(
    phone: str, sender_id: uuid.UUID, before: tuple[datetime, uuid.UUID] | None, limit: int
) -> Select[Any]:
    """Every client's messages to the number from the sender and our own replies (no client),
    newest first, `limit` at most. The index leads with the client: one `LATERAL` scan per
    client (few) and one for our replies, each stopping after `limit`, then merged, as the
    message search does (`client_id IN (...)` would read every message of the number, then
    sort them)."""
    per_client = _sent(phone, sender_id, before, limit).where(Message.client_id == Client.id)
    lateral = per_client.correlate(Client).lateral()
    merged = union_all(
        select(lateral).select_from(Client.__table__.join(lateral, true())),
        _sent(phone, sender_id, before, limit).where(Message.client_id.is_(None)),
    ).subquery()
    return select(merged).order_by(merged.c.created_at.desc(), merged.c.id.desc()).limit(limit)


async def _outbound(
    session: AsyncSession,
    phone: str,
    sender_id: uuid.UUID,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
    show_bodies: bool,
) -> list[Turn]:
    rows = (await session.execute(outbound_statement(phone, sender_id, before, limit))).all()
    bodies: dict[uuid.UUID, str] = {}
    if show_bodies and rows:  # the page's clients' bodies, asked for: read by primary key
        found = await session.execute(
            select(Message.id, Message.body).where(Message.id.in_([row.id for row in rows]))
        )
        bodies = {row.id: row.body for row in found}
    return [
        Turn(
            id=row.id,
            at=row.created_at,
            direction=Direction.OUTBOUND,
            kind=row.kind,
            status=row.status,
            body=row.body if row.kind != REGULAR_KIND else bodies.get(row.id),
            keyword=None,
            keyword_category=None,
            reply_id=None,
            segments=row.segments,
        )
        for row in rows
    ]


async def _inbound(
    session: AsyncSession,
    phone: str,
    sender_id: uuid.UUID,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
    show_bodies: bool,
) -> list[Turn]:
    query = select(InboundMessage).where(
        InboundMessage.from_ == phone, InboundMessage.sender_id == sender_id
    )
    if before is not None:
        query = query.where(tuple_(InboundMessage.created_at, InboundMessage.id) < tuple_(*before))
    rows = await session.scalars(
        query.order_by(InboundMessage.created_at.desc(), InboundMessage.id.desc()).limit(limit)
    )
    return [
        Turn(
            id=inbound.id,
            at=inbound.created_at,
            direction=Direction.INBOUND,
            kind="inbound",
            status=None,
            body=inbound.body if show_bodies else None,
            keyword=inbound.keyword,
            keyword_category=inbound.keyword_category,
            reply_id=inbound.reply_message_id,
            segments=inbound.num_segments,
        )
        for inbound in rows
    ]
