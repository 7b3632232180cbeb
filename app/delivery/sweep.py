"""The periodic sweep: finds committed work that is not on the queue (old idempotency keys are
retention's: app.db.retention)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from app.db.models import Message
from app.db.session import SessionFactory
from app.kernel.status import MessageStatus

SWEEP_BATCH = 1000


async def sweep_once(
    session_factory: SessionFactory,
    *,
    grace: timedelta,
    limit: int = SWEEP_BATCH,
) -> list[uuid.UUID]:
    """Ids of queued messages due for more than `grace` (their job was lost or never queued),
    the longest overdue first, at most `limit`.

    Only messages truly overdue: a message the delivery gate put back (a sender's pace, an open
    circuit, a paused provider) or a retry records when it is next due (`next_attempt_at`), so a
    backlog waiting for its turn is not selected again and again ahead of a message whose
    enqueue really failed (`ix_messages_queued_due` serves the query).

    Re-enqueueing one that is in fact still queued is harmless: the job id dedupes it in Redis
    and the conditional claim dedupes it in PostgreSQL.
    """
    async with session_factory.begin() as session:
        due = await session.scalars(
            select(Message.id)
            .where(
                Message.status == MessageStatus.QUEUED.value,
                Message.next_attempt_at < datetime.now(UTC) - grace,
            )
            .order_by(Message.next_attempt_at)
            .limit(limit)
        )
        return list(due)
