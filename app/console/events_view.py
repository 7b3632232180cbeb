"""Failing event endpoints and events, for an operator, and redelivery.

Redelivery is app.events' (`redeliver`, what POST /v1/events/{id}/redeliver does: refused while
the event is pending or its endpoint disabled; the job is queued after the commit). The lists
read the failed events through the partial index `ix_webhook_events_failed`, and the disabled
endpoints through `ix_webhook_endpoints_disabled` (migration `console_views`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import CTE, case, func, select, tuple_, union
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal
from app.db.models import ApiKey, Client, Sender, WebhookEndpoint, WebhookEvent
from app.events.outbox import EventStatus, EventView, redeliver
from app.kernel.errors import NotFound, ValidationFailed

LIST_LIMIT: Final = 50
MAX_LIST_LIMIT: Final = 200
FAILING_WINDOW: Final = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class FailingEndpoint:
    """An endpoint that is disabled or whose events failed lately."""

    id: uuid.UUID
    url: str
    owner: str  # "client <name>" or "sender <address>"
    disabled_at: datetime | None
    disabled_reason: str | None
    failed_events: int  # within the window
    last_failure_at: datetime | None


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """A failed event, or a pending one whose attempts so far failed."""

    id: uuid.UUID
    seq: int
    type: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None  # pending ones: when it is tried again
    endpoint_id: uuid.UUID
    url: str
    message_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class FailedEventPage:
    """Failed events newest first; `next_cursor`: (created_at, seq) of the last one."""

    events: list[FailedEvent]
    next_cursor: tuple[datetime, int] | None


def _owner(client_name: str | None, sender_address: str | None) -> str:
    return f"client {client_name}" if client_name is not None else f"sender {sender_address}"


@dataclass(frozen=True, slots=True)
class EndpointPage:
    """Failing endpoints in the list's order; `next_cursor`: where the next page starts."""

    endpoints: list[FailingEndpoint]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class EndpointCursor:
    """A place in the failing endpoints' list: the window its walk counts over (from `since`),
    and the last endpoint shown (enabled?, failures, id)."""

    since: datetime
    enabled: int
    failed: int
    id: uuid.UUID


def _endpoint_position(since: datetime, endpoint: FailingEndpoint) -> str:
    """An endpoint's place in the list, as a cursor: the window's start (microseconds since the
    epoch), enabled?, failures, id."""
    micros = round(since.timestamp() * 1_000_000)
    enabled = int(endpoint.disabled_at is None)
    return f"{micros}.{enabled}.{endpoint.failed_events}.{endpoint.id}"


def read_endpoint_cursor(cursor: str, *, now: datetime | None = None) -> EndpointCursor:
    """The place an endpoints cursor points at, or `ValidationFailed` naming `cursor` (also for
    a window that does not end within the last `FAILING_WINDOW`: the count stays bounded)."""
    now = now or datetime.now(UTC)
    try:
        micros, enabled, failed, endpoint_id = cursor.split(".")
        since = datetime.fromtimestamp(int(micros) / 1_000_000, UTC)
        place = EndpointCursor(since, int(enabled), int(failed), uuid.UUID(endpoint_id))
    except (ValueError, OverflowError, OSError):
        place = EndpointCursor(now, -1, -1, uuid.UUID(int=0))
    fresh = now - 2 * FAILING_WINDOW <= place.since <= now
    if place.enabled not in (0, 1) or place.failed < 0 or not fresh:
        raise ValidationFailed.for_field("invalid_cursor", "cursor", "not a cursor of this list")
    return place


def _failures_since(since: datetime) -> CTE:
    """Each endpoint's failed events since `since`: how many, and the newest's time."""
    return (
        select(
            WebhookEvent.endpoint_id,
            func.count().label("failed"),
            func.max(WebhookEvent.created_at).label("last"),
        )
        .where(WebhookEvent.status == EventStatus.FAILED.value, WebhookEvent.created_at >= since)
        .group_by(WebhookEvent.endpoint_id)
        .cte("failures")
    )


async def failing_endpoints(
    session: AsyncSession,
    *,
    now: datetime | None = None,
    after: EndpointCursor | None = None,
    limit: int = LIST_LIMIT,
) -> EndpointPage:
    """Disabled endpoints and those with failed events in the last week, most failures first,
    a page after the cursor `after` (`read_endpoint_cursor`). The order is computed (a count):
    every page groups the window's failed events (`ix_webhook_events_failed`) and reads the
    disabled endpoints (`ix_webhook_endpoints_disabled`), then starts after the cursor. The
    window's start travels in the cursor: every page of one walk counts over the same window
    (a window moving with `now` would drop failures between pages, and reorder the list)."""
    limit = max(1, min(limit, MAX_LIST_LIMIT))
    since = after.since if after is not None else (now or datetime.now(UTC)) - FAILING_WINDOW
    failures = _failures_since(since)
    # Each part through its own index: the failed events', the disabled endpoints'.
    wanted = union(
        select(failures.c.endpoint_id),
        select(WebhookEndpoint.id).where(WebhookEndpoint.disabled_at.is_not(None)),
    ).subquery("wanted")
    enabled = case((WebhookEndpoint.disabled_at.is_(None), 1), else_=0)
    failed = func.coalesce(failures.c.failed, 0)
    query = (
        select(WebhookEndpoint, Client.name, Sender.address, failures.c.failed, failures.c.last)
        .select_from(wanted)
        .join(WebhookEndpoint, WebhookEndpoint.id == wanted.c.endpoint_id)
        .outerjoin(failures, failures.c.endpoint_id == WebhookEndpoint.id)
        .outerjoin(Client, Client.id == WebhookEndpoint.client_id)
        .outerjoin(Sender, Sender.id == WebhookEndpoint.sender_id)
    )
    if after is not None:
        query = query.where(
            tuple_(enabled, -failed, WebhookEndpoint.id)
            > tuple_(after.enabled, -after.failed, after.id)
        )
    rows = await session.execute(
        query.order_by(enabled, failed.desc(), WebhookEndpoint.id).limit(limit + 1)
    )
    found = [
        FailingEndpoint(
            id=endpoint.id,
            url=endpoint.url,
            owner=_owner(client_name, sender_address),
            disabled_at=endpoint.disabled_at,
            disabled_reason=endpoint.disabled_reason,
            failed_events=int(failed_count or 0),
            last_failure_at=last,
        )
        for endpoint, client_name, sender_address, failed_count, last in rows
    ]
    more = len(found) > limit
    page = found[:limit]
    return EndpointPage(page, _endpoint_position(since, page[-1]) if more else None)


def _failed_event(event: WebhookEvent, url: str) -> FailedEvent:
    return FailedEvent(
        id=event.id,
        seq=event.seq,
        type=event.type,
        status=event.status,
        attempts=event.attempts,
        last_error=event.last_error,
        created_at=event.created_at,
        next_attempt_at=event.next_attempt_at
        if event.status == EventStatus.PENDING.value
        else None,
        endpoint_id=event.endpoint_id,
        url=url,
        message_id=event.message_id,
    )


async def _with_urls(session: AsyncSession, events: list[WebhookEvent]) -> list[FailedEvent]:
    """The page's events with their endpoints' URLs, read by primary key (a page's worth)."""
    ids = {event.endpoint_id for event in events}
    urls: dict[uuid.UUID, str] = {}
    if ids:
        found = await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url).where(WebhookEndpoint.id.in_(ids))
        )
        urls = {row.id: row.url for row in found}
    return [_failed_event(event, urls.get(event.endpoint_id, "")) for event in events]


async def failed_events(
    session: AsyncSession,
    *,
    endpoint_id: uuid.UUID | None = None,
    after: tuple[datetime, int] | None = None,
    limit: int = LIST_LIMIT,
) -> FailedEventPage:
    """Failed events, newest first, after the (created_at, seq) cursor `after`."""
    limit = max(1, min(limit, MAX_LIST_LIMIT))
    query = select(WebhookEvent).where(WebhookEvent.status == EventStatus.FAILED.value)
    if endpoint_id is not None:
        query = query.where(WebhookEvent.endpoint_id == endpoint_id)
    if after is not None:
        query = query.where(tuple_(WebhookEvent.created_at, WebhookEvent.seq) < tuple_(*after))
    rows = list(
        await session.scalars(
            query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.seq.desc()).limit(limit + 1)
        )
    )
    events = await _with_urls(session, rows[:limit])
    more = len(rows) > limit
    return FailedEventPage(
        events=events, next_cursor=(events[-1].created_at, events[-1].seq) if more else None
    )


async def retrying_events(
    session: AsyncSession,
    *,
    after: tuple[datetime, int] | None = None,
    limit: int = LIST_LIMIT,
) -> FailedEventPage:
    """Pending events whose attempts so far failed, next due first, after the (next_attempt_at,
    seq) cursor `after` (`ix_webhook_events_pending_due`: the pending ones only, in
    next_attempt_at order; ties, rare, sorted by seq)."""
    limit = max(1, min(limit, MAX_LIST_LIMIT))
    query = select(WebhookEvent).where(
        WebhookEvent.status == EventStatus.PENDING.value, WebhookEvent.attempts > 0
    )
    if after is not None:
        query = query.where(tuple_(WebhookEvent.next_attempt_at, WebhookEvent.seq) > tuple_(*after))
    rows = list(
        await session.scalars(
            query.order_by(WebhookEvent.next_attempt_at, WebhookEvent.seq).limit(limit + 1)
        )
    )
    events = await _with_urls(session, rows[:limit])
    more = len(rows) > limit
    cursor = (rows[limit - 1].next_attempt_at, rows[limit - 1].seq) if more else None
    return FailedEventPage(events=events, next_cursor=cursor)


async def redeliver_event(
    session: AsyncSession, operator_key_id: uuid.UUID, event_id: uuid.UUID
) -> EventView:
    """Send an event again now, as POST /v1/events/{id}/redeliver does for the operator's admin
    key (every event is visible to it); Conflict while it is pending or its endpoint disabled,
    NotFound for an unknown event (or a key no longer an admin's)."""
    key = await session.get(ApiKey, operator_key_id)
    client = await session.get(Client, key.client_id) if key is not None else None
    if key is None or client is None or not key.is_admin:
        raise NotFound("event_not_found", f"no event with id {event_id}")
    principal = Principal(
        client_id=client.id,
        client_name=client.name,
        default_sender_id=None,
        is_admin=True,
        key_id=key.id,
    )
    return await redeliver(session, principal, event_id)
