"""Held messages: an admin releases or cancels what the pumping alarm stopped.

One message in the request's transaction; a client's held messages in chunks of
`transitions.HELD_CHUNK`, each its own short transaction, the released ones handed to the
workers after each commit. The state changes themselves are `transitions.settle_held`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, Message
from app.db.session import SessionFactory
from app.delivery.transitions import HELD_CHUNK, run_transaction, settle_held
from app.events.outbox import EventJob
from app.kernel.errors import Conflict, NotFound


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


@dataclass(frozen=True, slots=True)
class Settler:
    """What a bulk release or cancel needs: transactions, and the queues to hand work to."""

    session_factory: SessionFactory
    enqueue: Callable[[Sequence[uuid.UUID]], Awaitable[None]]
    enqueue_events: Callable[[Sequence[EventJob]], Awaitable[object]]

    async def settle_client(self, client_id: uuid.UUID, *, release: bool) -> int:
        """Release or cancel every message of the client held before now, chunk by chunk; how
        many moved. `NotFound` for an unknown client."""
        async with self.session_factory() as session:
            if await session.scalar(select(Client.id).where(Client.id == client_id)) is None:
                raise NotFound("client_not_found", f"no client with id {client_id}")
        before = datetime.now(UTC)
        total = 0
        while True:

            async def chunk(session: AsyncSession) -> list[uuid.UUID]:
                return await settle_held(
                    session, release=release, client_id=client_id, before=before
                )

            ids, events = await run_transaction(self.session_factory, chunk)
            if release and ids:
                await self.enqueue(ids)
            if events:
                await self.enqueue_events(events)
            total += len(ids)
            if len(ids) < HELD_CHUNK:
                return total
