"""The periodic sweep: finds committed work that is not on the queue, and old idempotency keys."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from app.db.models import Message
from app.db.session import SessionFactory
from app.domain.idempotency import delete_expired_keys
from app.domain.status import MessageStatus

SWEEP_BATCH = 1000


async def sweep_once(
    session_factory: SessionFactory, *, grace: timedelta, idempotency_ttl: timedelta
) -> list[uuid.UUID]:
    """Ids of queued messages due for more than `grace` (their job was lost or never queued).

    Re-enqueueing one that is in fact still queued is harmless: the job id dedupes it in Redis
    and the conditional claim dedupes it in PostgreSQL.
    """
    async with session_factory.begin() as session:
        await delete_expired_keys(session, idempotency_ttl)
        due = await session.scalars(
            select(Message.id)
            .where(
                Message.status == MessageStatus.QUEUED.value,
                Message.next_attempt_at < datetime.now(UTC) - grace,
            )
            .order_by(Message.next_attempt_at)
            .limit(SWEEP_BATCH)
        )
        return list(due)
