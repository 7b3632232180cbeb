"""Held messages: an admin releases or cancels what the pumping alarm stopped.

One message in the request's transaction; a client's held messages in chunks of
`transitions.HELD_CHUNK`, each its own short transaction, the released ones handed to the
workers after each commit. The state changes themselves are `transitions.settle_held`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, Message
from app.db.session import ENQUEUE_AFTER_COMMIT, SessionFactory
from app.delivery.transitions import HELD_CHUNK, run_transaction, settle_held
from app.events.outbox import EventJob
from app.kernel.errors import Conflict, NotFound
from app.kernel.pagination import decode_cursor, encode_cursor
from app.kernel.status import MessageStatus


def not_held(message_id: uuid.UUID, status: str) -> Conflict:
    """The message has left `held` (released, canceled, or never held): nothing was done."""
    return Conflict("message_not_held", f"message {message_id} is {status}, not held")


async def settle_one(session: AsyncSession, message_id: uuid.UUID, *, release: bool) -> Message:
    """Release or cancel one held message, in the session's transaction; the message after it.
    `NotFound` for no such message, `Conflict` (`message_not_held`) for one not held."""
    moved = await settle_held(session, release=release, message_id=message_id)
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None:
        raise NotFound("message_not_found", f"no message with id {message_id}")
    if not moved:
        raise not_held(message_id, message.status)
    return message


async def client_id_named(session: AsyncSession, client_name: str) -> uuid.UUID:
    """The id of the client so named; `NotFound` (`client_not_found`) for none."""
    client_id = await session.scalar(select(Client.id).where(Client.name == client_name))
    if client_id is None:
        raise NotFound("client_not_found", f"no client named {client_name!r}")
    return client_id


@dataclass(frozen=True, slots=True)
class HeldPage:
    """One page of a client's held messages, newest first."""

    items: list[Message]
    next_cursor: str | None


async def list_held(
    session: AsyncSession, client_name: str, *, limit: int, cursor: str | None
) -> HeldPage:
    """A page of a client's held messages, newest first, after `cursor` if given: read through
    `ix_messages_held` (client, created_at; only held rows)."""
    client_id = await client_id_named(session, client_name)
    query = select(Message).where(
        Message.client_id == client_id, Message.status == MessageStatus.HELD.value
    )
    if cursor is not None:
        created_at, message_id = decode_cursor(cursor, uuid.UUID)
        query = query.where(tuple_(Message.created_at, Message.id) < tuple_(created_at, message_id))
    order = (Message.created_at.desc(), Message.id.desc())
    rows = list(await session.scalars(query.order_by(*order).limit(limit + 1)))
    items = rows[:limit]
    more = len(rows) > limit
    return HeldPage(items, encode_cursor(items[-1].created_at, items[-1].id) if more else None)


@dataclass(frozen=True, slots=True)
class Settler:
    """What a bulk release or cancel needs: transactions, and the queues to hand work to."""

    session_factory: SessionFactory
    enqueue: Callable[[Sequence[uuid.UUID]], Awaitable[None]]
    enqueue_events: Callable[[Sequence[EventJob]], Awaitable[object]]

    async def settle_client(self, client_name: str, *, release: bool) -> int:
        """Release or cancel every message of the client held before now, chunk by chunk; how
        many moved. `NotFound` for an unknown client."""
        async with self.session_factory() as session:
            client_id = await client_id_named(session, client_name)
        return await self._settle(release=release, client_id=client_id, before=datetime.now(UTC))

    async def cancel_stale(self, max_days: int, *, max_chunks: int) -> int:
        """Cancel every client's messages held longer than `max_days` (`PUMPING__HELD_MAX_DAYS`:
        no admin decided; the retention job), as an admin's cancel does (`message.canceled`),
        at most `max_chunks` chunks (the rest next run); how many."""
        return await self._settle(
            release=False,
            client_id=None,
            before=datetime.now(UTC) - timedelta(days=max_days),
            reason=f"canceled: held longer than {max_days} days (PUMPING__HELD_MAX_DAYS)",
            source="retention",
            max_chunks=max_chunks,
        )

    async def _settle(
        self,
        *,
        release: bool,
        client_id: uuid.UUID | None,
        before: datetime,
        reason: str | None = None,
        source: str = "admin",
        max_chunks: int | None = None,
    ) -> int:
        """`settle_held` chunk after chunk, each its own transaction, its work handed to the
        queues after its commit, until a chunk comes back short (or `max_chunks` ran)."""

        async def chunk(session: AsyncSession) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
            moved = await settle_held(
                session,
                release=release,
                client_id=client_id,
                before=before,
                reason=reason,
                source=source,
            )
            # Those released `queued` (not those still `scheduled`) go to the workers.
            return moved, session.info.pop(ENQUEUE_AFTER_COMMIT, [])

        total = chunks = 0
        while True:
            (ids, queued), events = await run_transaction(self.session_factory, chunk)
            if queued:
                await self.enqueue(queued)
            if events:
                await self.enqueue_events(events)
            total += len(ids)
            chunks += 1
            if len(ids) < HELD_CHUNK or (max_chunks is not None and chunks >= max_chunks):
                return total
