"""The message lifecycle: statuses and the one rule for moving between them.

[scheduled ->] queued -> sending -> sent -> delivered | undelivered | failed, plus expired, canceled
and rejected. A `scheduled` message waits for its `send_at` (app.traffic.schedule) and is not on
any queue until then. `held` comes before `queued` too: a message the pumping alarm stopped
(app.traffic.velocity) waits there for an admin to release it (-> queued) or cancel it
(-> canceled); nothing sends it.
Providers report out of order and more than once, so a status only ever moves forward: a report of
an earlier or equal stage is recorded but changes nothing, and a terminal status is final.
"""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """Where a message is in its life."""

    SCHEDULED = "scheduled"
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
    MessageStatus.SCHEDULED: -1,
    MessageStatus.QUEUED: 0,
    MessageStatus.SENDING: 1,
    MessageStatus.SENT: 2,
    **dict.fromkeys(TERMINAL_STATUSES, 3),
}


def can_advance(current: MessageStatus, new: MessageStatus) -> bool:
    """True when moving from `current` to `new` is progress, not a late or repeated report."""
    return _STAGE[new] > _STAGE[current]


def statuses_before(new: MessageStatus) -> list[MessageStatus]:
    """Every status that `new` may replace (for the conditional UPDATEs of provider reports). Not
    `held` (only an admin moves a held message: app.delivery.transitions.settle_held) nor
    `scheduled` (a message no provider has seen leaves it only by its scheduler or a cancel)."""
    return [
        status
        for status in MessageStatus
        if status not in (MessageStatus.HELD, MessageStatus.SCHEDULED) and can_advance(status, new)
    ]
