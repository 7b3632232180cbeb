"""The message lifecycle: statuses and the one rule for moving between them.

queued -> sending -> sent -> delivered | undelivered | failed, plus expired, canceled and rejected.
`held` comes before `queued`: a message the pumping alarm stopped (app.traffic.velocity) waits
there for an admin to release it (-> queued) or cancel it (-> canceled); nothing sends it.
Providers report out of order and more than once, so a status only ever moves forward: a report of
an earlier or equal stage is recorded but changes nothing, and a terminal status is final.
"""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """Where a message is in its life."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELED = "canceled"
    REJECTED = "rejected"
    HELD = "held"


TERMINAL_STATUSES: frozenset[MessageStatus] = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.UNDELIVERED,
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
        MessageStatus.CANCELED,
        MessageStatus.REJECTED,
    }
)

_STAGE: dict[MessageStatus, int] = {
    MessageStatus.HELD: -1,
    MessageStatus.QUEUED: 0,
    MessageStatus.SENDING: 1,
    MessageStatus.SENT: 2,
    **dict.fromkeys(TERMINAL_STATUSES, 3),
}


def can_advance(current: MessageStatus, new: MessageStatus) -> bool:
    """True when moving from `current` to `new` is progress, not a late or repeated report."""
    return _STAGE[new] > _STAGE[current]


def statuses_before(new: MessageStatus) -> list[MessageStatus]:
    """Every status that `new` may replace (for conditional UPDATEs of reports). Not `held`:
    only an admin moves a held message (app.delivery.transitions.settle_held)."""
    return [
        status
        for status in MessageStatus
        if can_advance(status, new) and status is not MessageStatus.HELD
    ]
