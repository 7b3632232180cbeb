"""A number's consent as an operator sees it: its state per sender and service-wide, its
history, and the opt-out or opt-in an operator records with a reason.

The rules are app.consent's: the state per sender is `opted_out_pairs` (the send check's rule),
a change is `record_change` under the number's lock, exactly as PUT/DELETE /v1/opt-outs record
it (a change that would alter nothing adds no row); the actor is `operator:<key name>` and the
reason is the history row's detail.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.consent.optouts import (
    ChangeResult,
    OptAction,
    OptChange,
    OptSource,
    is_opted_out_of_scope,
    opted_out_pairs,
    record_change,
)
from app.db.models import OptOut
from app.kernel.errors import ValidationFailed
from app.senders.service import get_sender, list_senders

HISTORY_LIMIT: Final = 100
MAX_REASON_LENGTH: Final = 500


@dataclass(frozen=True, slots=True)
class SenderConsent:
    """Whether sends from one sender to the number are refused."""

    sender_id: uuid.UUID
    address: str
    opted_out: bool


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One recorded change."""

    at: datetime
    sender_id: uuid.UUID | None  # None: every sender
    sender_address: str | None
    action: str
    source: str
    actor: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class ConsentView:
    """A number's consent: per sender, service-wide, and the newest history rows."""

    phone: str
    service_wide_opted_out: bool
    senders: list[SenderConsent]
    history: list[HistoryRow]
    older: tuple[datetime, int] | None  # the cursor of older history rows (None: no more)


def operator_actor(key_name: str) -> str:
    """The actor recorded for an operator's change: the name of the key they signed in with."""
    return f"operator:{key_name}"


async def consent_view(
    session: AsyncSession,
    phone: str,
    *,
    before: tuple[datetime, int] | None = None,
    history_limit: int = HISTORY_LIMIT,
) -> ConsentView:
    """The state of `phone` (E.164) for every sender (there are few: one query for all, the
    send check's rule) and service-wide, and a page of its history, newest first, before the
    (created_at, id) cursor `before`. The number's rows are found through the phone prefix of
    `ix_opt_outs_phone_sender_created` and sorted: one number's history (its STOPs and STARTs,
    the imports and operators' changes naming it) is small."""
    senders = await list_senders(session)
    refused = await opted_out_pairs(session, [(phone, sender.id) for sender in senders])
    query = select(OptOut).where(OptOut.phone == phone)
    if before is not None:
        query = query.where(tuple_(OptOut.created_at, OptOut.id) < tuple_(*before))
    rows = list(
        await session.scalars(
            query.order_by(OptOut.created_at.desc(), OptOut.id.desc()).limit(history_limit + 1)
        )
    )
    last = rows[history_limit - 1] if len(rows) > history_limit else None
    addresses = {sender.id: sender.address for sender in senders}
    return ConsentView(
        phone=phone,
        service_wide_opted_out=await is_opted_out_of_scope(session, phone, None),
        senders=[
            SenderConsent(sender.id, sender.address, (phone, sender.id) in refused)
            for sender in senders
        ],
        history=[
            HistoryRow(
                at=row.created_at,
                sender_id=row.sender_id,
                sender_address=addresses.get(row.sender_id) if row.sender_id else None,
                action=row.action,
                source=row.source,
                actor=row.actor,
                detail=row.detail,
            )
            for row in rows[:history_limit]
        ],
        older=(last.created_at, last.id) if last is not None else None,
    )


async def record_operator_change(
    session: AsyncSession,
    *,
    phone: str,
    sender_id: uuid.UUID | None,
    action: OptAction,
    reason: str,
    key_name: str,
) -> ChangeResult:
    """Record an operator's opt-out or opt-in of `phone` (E.164) for one sender or, without
    one, service-wide; the reason is required. A change that would alter no sender's state adds
    nothing (`recorded` is False), as a repeated PUT /v1/opt-outs does."""
    reason = reason.strip()
    if not reason:
        raise ValidationFailed.for_field("invalid_reason", "reason", "say why: it is recorded")
    if len(reason) > MAX_REASON_LENGTH:
        raise ValidationFailed.for_field(
            "invalid_reason", "reason", f"at most {MAX_REASON_LENGTH} characters"
        )
    if "\x00" in reason:
        raise ValidationFailed.for_field("invalid_reason", "reason", "contains a NUL character")
    if sender_id is not None:
        await get_sender(session, sender_id)  # NotFound for an unknown sender
    return await record_change(
        session,
        OptChange(
            phone=phone,
            sender_id=sender_id,
            action=action,
            source=OptSource.API,
            actor=operator_actor(key_name),
            detail=reason,
        ),
        seen_from=sender_id,
        skip_unchanged=True,
    )
