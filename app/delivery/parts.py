"""Long messages whose provider reports on each part (Vonage): the parts' receipts, and the one
rule that settles a message from all of its parts.

A long SMS travels as separate parts, and Vonage sends one receipt per part, in any order. The
message is `delivered` only when every part is; it ends as soon as one part finally fails
(`failed`, `expired` or `rejected`, as that part's receipt says), with that part's code and a
message naming the part; a part the carrier has, or delivered, makes it `sent`. Each part's
latest status is kept in `message_parts`, written by the acceptance (each part's id, place and
the part count) and by each receipt. Both lock the message row first, so two receipts (or a
receipt and the acceptance) never decide without seeing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, MessagePart
from app.kernel.status import TERMINAL_STATUSES, MessageStatus, can_advance
from app.providers.base import StatusReport

# A part with one of these will never be delivered: the message is not either.
PART_FAILURES = TERMINAL_STATUSES - {MessageStatus.DELIVERED}


@dataclass(frozen=True, slots=True)
class Part:
    """One part as recorded: where it belongs (when the acceptance is recorded) and its status."""

    provider_message_id: str
    number: int | None
    total: int | None
    status: MessageStatus | None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def name(self) -> str:
        """How history and error messages name the part."""
        if self.number is not None and self.total is not None:
            return f"part {self.number} of {self.total}"
        return f"part {self.provider_message_id}"  # its place is not recorded yet


@dataclass(frozen=True, slots=True)
class Settlement:
    """Where a report (or a message's parts) says the message is now, and why."""

    status: MessageStatus | None
    error_code: str | None = None
    error_message: str | None = None
    detail: str | None = None  # for the history row


def settle(parts: Sequence[Part], news: Part | None = None) -> Settlement:
    """The status a message's parts give it; `news` (one of `parts`) is the part just reported.

    A failed part decides at once (the part just reported, else the first failed one); every
    part delivered (the part count known from the acceptance) is `delivered`; a part the
    carrier has or delivered is `sent`; otherwise nothing moves.
    """
    failed = sorted(
        (p for p in parts if p.status in PART_FAILURES),
        key=lambda p: (p != news, p.number is None, p.number or 0),
    )
    if failed:
        part = failed[0]
        assert part.status is not None
        reason = f"{part.error_code}: {part.error_message or 'no reason given'}"
        text = f"{part.name} {part.status.value} ({reason if part.error_code else 'no code'})"
        return Settlement(part.status, part.error_code, text, text)
    total = next((p.total for p in parts if p.total is not None), None)
    delivered = {p.number for p in parts if p.number and p.status is MessageStatus.DELIVERED}
    if total is not None and len(delivered) >= total:
        return Settlement(MessageStatus.DELIVERED, detail=f"all {total} parts delivered")
    done = f"{len(delivered)} of {total if total is not None else '?'} parts delivered"
    if any(p.status in (MessageStatus.SENT, MessageStatus.DELIVERED) for p in parts):
        detail = f"{news.name} {news.status.value}; {done}" if news and news.status else done
        return Settlement(MessageStatus.SENT, detail=detail)
    return Settlement(None, detail=done)


async def apply_part_report(
    session: AsyncSession, message: Message, report: StatusReport
) -> Settlement:
    """Record a receipt for one part (its status only moves forward) and settle the message
    from all its parts. Locks the message row and refreshes `message` first."""
    await session.get(Message, message.id, populate_existing=True, with_for_update=True)
    rows = await _parts(session, [message.id])
    row = next((r for r in rows if r.provider_message_id == report.provider_message_id), None)
    if row is None:  # before the acceptance was recorded, or a part it did not name
        row = MessagePart(message_id=message.id, provider_message_id=report.provider_message_id)
        session.add(row)
        rows.append(row)
    current = MessageStatus(row.status) if row.status else None
    news = report.status is not None and (current is None or can_advance(current, report.status))
    if news:
        assert report.status is not None
        row.status = report.status.value
        row.error_code = report.error_code
        row.error_message = report.error_message
        row.provider_status = report.provider_status
    await session.flush()
    part = _part(row)
    if not news:
        # Late, repeated, or no status of ours: it changes nothing, whatever the others say.
        return Settlement(None, detail=f"{part.name}: {report.provider_status}, nothing new")
    return settle([_part(r) for r in rows], part)


async def record_accepted_parts(
    session: AsyncSession, accepted: Sequence[tuple[uuid.UUID, Sequence[str]]]
) -> dict[uuid.UUID, Settlement]:
    """Record each accepted message's parts (id, place, count), merging receipts that came
    first; what their parts now say of the messages they settle (every part delivered)."""
    if not accepted:
        return {}
    ids = sorted(message_id for message_id, _ in accepted)
    # The rows' locks in one order (receipts take them too, one message at a time).
    await session.execute(
        select(Message.id).where(Message.id.in_(ids)).order_by(Message.id).with_for_update()
    )
    rows = await _parts(session, ids)
    by_key = {(r.message_id, r.provider_message_id): r for r in rows}
    settled = {}
    for message_id, part_ids in accepted:
        mine = []
        for number, part_id in enumerate(part_ids, 1):
            row = by_key.get((message_id, part_id))
            if row is None:
                row = MessagePart(message_id=message_id, provider_message_id=part_id)
                session.add(row)
            row.number, row.total = number, len(part_ids)
            mine.append(row)
        # Receipts for ids the acceptance did not name count for nothing.
        settlement = settle([_part(r) for r in mine])
        if settlement.status in (MessageStatus.DELIVERED, *PART_FAILURES):
            settled[message_id] = settlement
    await session.flush()
    return settled


async def _parts(session: AsyncSession, message_ids: Sequence[uuid.UUID]) -> list[MessagePart]:
    return list(
        await session.scalars(
            select(MessagePart)
            .where(MessagePart.message_id.in_(message_ids))
            .execution_options(populate_existing=True)
        )
    )


def _part(row: MessagePart) -> Part:
    return Part(
        provider_message_id=row.provider_message_id,
        number=row.number,
        total=row.total,
        status=MessageStatus(row.status) if row.status else None,
        error_code=row.error_code,
        error_message=row.error_message,
    )
