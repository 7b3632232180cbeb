"""Scheduled sends: the rule for a client's `send_at`.

A message with a `send_at` is stored `scheduled` and is on no queue: PostgreSQL is the only place
it waits (`ix_messages_scheduled_due`), so it survives worker restarts and a Redis that lost
everything. The worker's scheduler (app.worker.scheduler) moves due messages to `queued` with the
database's clock (app.delivery.transitions.promote_scheduled) and hands them to the delivery feed,
where they take the road of every message: the claim checks the recipient's opt-out again and the
validity period (counted from `send_at`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

# A send_at nearer than this is refused (it would be sent about as soon as an immediate send,
# and a clock skew between client and service could put it in the past).
MIN_LEAD: Final = timedelta(seconds=60)
# And one further than this (a schedule that far is a calendar's job, not a queue's).
MAX_LEAD: Final = timedelta(days=35)


def send_at_problem(send_at: datetime, now: datetime) -> str | None:
    """Why `send_at` is refused (as said to the client), or None when it is within bounds."""
    if send_at - now < MIN_LEAD:
        return f"must be at least {MIN_LEAD.seconds} seconds in the future"
    if send_at - now > MAX_LEAD:
        return f"must be at most {MAX_LEAD.days} days in the future"
    return None
