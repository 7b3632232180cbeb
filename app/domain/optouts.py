"""Opt-out state: the newest history row for (phone, sender) decides; a row without a sender
applies to every sender. Rows are only ever added."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import OptOut


async def is_opted_out(session: AsyncSession, phone: str, sender_id: uuid.UUID) -> bool:
    """True when `phone` opted out of this sender, or of every sender, and has not opted back in.

    The newest row among the sender's own and the service-wide rows wins, so a START to one sender
    after a service-wide STOP re-allows that sender (the customer asked it directly).
    """
    newest = await session.scalar(
        select(OptOut.action)
        .where(
            OptOut.phone == phone,
            (OptOut.sender_id == sender_id) | OptOut.sender_id.is_(None),
        )
        .order_by(OptOut.created_at.desc(), OptOut.id.desc())
        .limit(1)
    )
    return newest == "opt_out"
