"""Events out: what happened, written as an outbox in the same transaction as the change.

A status change of a message, an inbound message that is not a keyword, or an opt-out change
writes one `WebhookEvent` row per endpoint that should hear of it, in the transaction that makes
the change; so an event exists exactly when the change was committed. The event's id is noted in
`session.info`, and whoever commits the transaction (the API's session dependency, the worker's
task) enqueues its delivery afterwards; the events sweep enqueues any whose job was lost.

What is emitted, and to whom:

* `message.sent`, `.delivered`, `.undelivered`, `.failed`, `.expired`, `.canceled`,
  `.rejected` — a client's message moved to that status. To the message's `callback_url`, else
  to the client's default endpoint; nothing when there is neither. `queued` and `sending` are
  not events: the client knows a message is queued from the 202, and `sending` flips back to
  `queued` on every retried submission, which is our business, not the client's.
* `inbound.received` — a customer's message to a sender that matched no keyword. To the
  sender's endpoint (keywords are handled here: STOP shows up as `opt_out.changed`).
* `traffic.pumping_suspected` — the pumping alarm fired for one of the client's number ranges
  (app.traffic.velocity): once per range and window. To the client's default endpoint.
* `opt_out.changed` — a number opted out of (or back in to) a sender, by keyword, API or provider
  error, when that changed its state. To the sender's endpoint; a service-wide change to every
  sender's endpoint. A bulk CSV import emits none (it migrates existing lists; 100,000 lines
  would be 100,000 requests).

Events of one message (and of one number's opt-outs, and one customer's inbound messages) share an
ordering key: an endpoint gets them in the order they were written, each one only after the one
before was delivered or given up.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, and_, or_, select, text, true
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal
from app.db.models import InboundMessage, Message, WebhookAttempt, WebhookEndpoint, WebhookEvent
from app.events.endpoints import Owner, default_endpoint, default_sender_endpoints
from app.events.endpoints import endpoint_for_url as _endpoint_for_url
from app.kernel.errors import Conflict, NotFound
from app.kernel.pagination import decode_cursor, encode_cursor
from app.kernel.status import MessageStatus
from app.twilio_api.vocabulary import callback_params

# Session.info key: deliveries to enqueue once the transaction has committed.
EVENTS_AFTER_COMMIT = "events_after_commit"


class EventType(StrEnum):
    """The kinds of event, as `type` in the payload."""

    MESSAGE_SENT = "message.sent"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_UNDELIVERED = "message.undelivered"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_EXPIRED = "message.expired"
    MESSAGE_CANCELED = "message.canceled"
    MESSAGE_REJECTED = "message.rejected"
    INBOUND_RECEIVED = "inbound.received"
    OPT_OUT_CHANGED = "opt_out.changed"
    TRAFFIC_PUMPING_SUSPECTED = "traffic.pumping_suspected"


MESSAGE_EVENTS: dict[MessageStatus, EventType] = {
    MessageStatus.SENT: EventType.MESSAGE_SENT,
    MessageStatus.DELIVERED: EventType.MESSAGE_DELIVERED,
    MessageStatus.UNDELIVERED: EventType.MESSAGE_UNDELIVERED,
    MessageStatus.FAILED: EventType.MESSAGE_FAILED,
    MessageStatus.EXPIRED: EventType.MESSAGE_EXPIRED,
    MessageStatus.CANCELED: EventType.MESSAGE_CANCELED,
    MessageStatus.REJECTED: EventType.MESSAGE_REJECTED,
}


class EventStatus(StrEnum):
    """Where an event's delivery is."""

    PENDING = "pending"  # not delivered yet: due now, or waiting for a retry
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # given up: a permanent answer, a disabled endpoint, or retries exhausted


# ---- Payloads (the bodies receivers get; also the OpenAPI `webhooks` documentation) ----

_EVENT_ID_EXAMPLE = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


class MessageData(BaseModel):
    """The message as it was right after the change."""

    model_config = ConfigDict(populate_by_name=True)

    id: uuid.UUID = Field(examples=["5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"])
    status: MessageStatus = Field(examples=["delivered"])
    to: str = Field(examples=["+14155550123"])
    from_: str = Field(alias="from", examples=["+14155550100"])
    body: str = Field(examples=["Your order #1042 has shipped."])
    encoding: str = Field(examples=["GSM-7"])
    segments: int = Field(examples=[1])
    provider: str = Field(examples=["twilio"])
    provider_message_id: str | None = Field(examples=["SM0123456789abcdef0123456789abcdef"])
    error_code: str | None = Field(
        description="Why the message is in this state (the provider's code, or ours such as "
        "`partially_sent`); null once a retry succeeded.",
        examples=[None],
    )
    error_message: str | None = Field(
        description="The error in words; for a long message, which part (`part 3 of 3 failed "
        "(6: …)`) or how many parts were accepted.",
        examples=[None],
    )
    metadata: dict[str, Any] = Field(examples=[{"order_id": "1042"}])
    created_at: datetime
    updated_at: datetime


class InboundData(BaseModel):
    """A customer's message to one of our senders."""

    model_config = ConfigDict(populate_by_name=True)

    id: uuid.UUID = Field(examples=["9d1c7e52-60f3-4b55-8f0e-1d2c3b4a5f60"])
    sender_id: uuid.UUID = Field(examples=["0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"])
    to: str = Field(description="Our sender's address.", examples=["+14155550100"])
    from_: str = Field(alias="from", examples=["+14155550123"])
    body: str = Field(examples=["Is my order on its way?"])
    num_segments: int | None = Field(examples=[1])
    provider: str = Field(examples=["twilio"])
    provider_message_id: str = Field(examples=["SMfedcba9876543210fedcba9876543210"])
    created_at: datetime


class OptOutData(BaseModel):
    """A number's opt-out state changed."""

    phone: str = Field(examples=["+14155550123"])
    sender_id: uuid.UUID | None = Field(
        description="The sender it concerns; null: every sender of the service.",
        examples=["0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"],
    )
    opted_out: bool = Field(description="The state now.", examples=[True])
    action: str = Field(description="`opt_out` or `opt_in`.", examples=["opt_out"])
    source: str = Field(description="`keyword`, `api` or `provider_error`.", examples=["keyword"])
    actor: str | None = Field(examples=["recipient"])
    detail: str | None = Field(examples=["STOP to +14155550100"])
    changed_at: datetime


class PumpingData(BaseModel):
    """A number range where a client's traffic looks like SMS pumping (README, "SMS pumping
    defence")."""

    client_id: uuid.UUID = Field(examples=["3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090"])
    range: str = Field(
        description="The country calling code and the first digits of the national number.",
        examples=["+44 7911"],
    )
    distinct_numbers: int = Field(
        description="Distinct numbers of the range sent to in the window (and the one before).",
        examples=[212],
    )
    usual: float = Field(
        description="The client's usual count of distinct numbers there per window.",
        examples=[0.4],
    )
    threshold: float = Field(description="The count the alarm fired at.", examples=[50])
    window_seconds: int = Field(examples=[60])
    action: str = Field(
        description="`alert` (the messages go out) or `hold` (they are `held` until an admin "
        "releases or cancels them).",
        examples=["hold"],
    )
    detected_at: datetime


class _Envelope(BaseModel):
    id: uuid.UUID = Field(
        description="The event id, also sent as `webhook-id`: the same on every retry and "
        "redelivery. Dedupe on it: delivery is at least once.",
        examples=[_EVENT_ID_EXAMPLE],
    )
    timestamp: datetime = Field(description="When the change happened (not when it was sent).")


class MessageEventPayload(_Envelope):
    """A message's status changed (`message.sent`, `message.delivered`, …)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EVENT_ID_EXAMPLE,
                    "type": "message.delivered",
                    "timestamp": "2026-11-26T10:00:03Z",
                    "data": {
                        "id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10",
                        "status": "delivered",
                        "to": "+14155550123",
                        "from": "+14155550100",
                        "body": "Your order #1042 has shipped.",
                        "encoding": "GSM-7",
                        "segments": 1,
                        "provider": "twilio",
                        "provider_message_id": "SM0123456789abcdef0123456789abcdef",
                        "error_code": None,
                        "error_message": None,
                        "metadata": {"order_id": "1042"},
                        "created_at": "2026-11-26T10:00:00Z",
                        "updated_at": "2026-11-26T10:00:03Z",
                    },
                }
            ]
        }
    )

    type: EventType = Field(examples=["message.delivered"])
    data: MessageData


class InboundEventPayload(_Envelope):
    """A customer's message that is not a keyword (`inbound.received`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EVENT_ID_EXAMPLE,
                    "type": "inbound.received",
                    "timestamp": "2026-11-26T10:05:00Z",
                    "data": {
                        "id": "9d1c7e52-60f3-4b55-8f0e-1d2c3b4a5f60",
                        "sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
                        "to": "+14155550100",
                        "from": "+14155550123",
                        "body": "Is my order on its way?",
                        "num_segments": 1,
                        "provider": "twilio",
                        "provider_message_id": "SMfedcba9876543210fedcba9876543210",
                        "created_at": "2026-11-26T10:05:00Z",
                    },
                }
            ]
        }
    )

    type: EventType = Field(examples=["inbound.received"])
    data: InboundData


class OptOutEventPayload(_Envelope):
    """A number opted out of a sender, or back in (`opt_out.changed`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EVENT_ID_EXAMPLE,
                    "type": "opt_out.changed",
                    "timestamp": "2026-11-26T10:06:00Z",
                    "data": {
                        "phone": "+14155550123",
                        "sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
                        "opted_out": True,
                        "action": "opt_out",
                        "source": "keyword",
                        "actor": "recipient",
                        "detail": "STOP to +14155550100",
                        "changed_at": "2026-11-26T10:06:00Z",
                    },
                }
            ]
        }
    )

    type: EventType = Field(examples=["opt_out.changed"])
    data: OptOutData


class PumpingEventPayload(_Envelope):
    """The pumping alarm fired for a number range (`traffic.pumping_suspected`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EVENT_ID_EXAMPLE,
                    "type": "traffic.pumping_suspected",
                    "timestamp": "2026-11-26T10:07:00Z",
                    "data": {
                        "client_id": "3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090",
                        "range": "+44 7911",
                        "distinct_numbers": 212,
                        "usual": 0.4,
                        "threshold": 50,
                        "window_seconds": 60,
                        "action": "hold",
                        "detected_at": "2026-11-26T10:07:00Z",
                    },
                }
            ]
        }
    )

    type: EventType = Field(examples=["traffic.pumping_suspected"])
    data: PumpingData


# ---- Writing events (the outbox) ----


class EventJob(NamedTuple):
    """A delivery to enqueue after commit. `tag` distinguishes jobs for the same event that must
    not be merged with a queued one (a redelivery, a wake-up after the previous event)."""

    event_id: uuid.UUID
    tag: str = ""


def schedule(session: AsyncSession, job: EventJob) -> None:
    """Enqueue this delivery once the session's transaction has committed."""
    session.info.setdefault(EVENTS_AFTER_COMMIT, []).append(job)


def scheduled(session: AsyncSession) -> tuple[EventJob, ...]:
    """The deliveries the transaction scheduled (taken: call it once, after the commit)."""
    return tuple(session.info.pop(EVENTS_AFTER_COMMIT, ()))


async def _write(
    session: AsyncSession,
    endpoint: WebhookEndpoint,
    event_type: EventType,
    data: BaseModel | dict[str, str],
    *,
    ordering_key: str,
    message_id: uuid.UUID | None = None,
) -> WebhookEvent:
    """An event for `endpoint`: `data` in our envelope (standard), or a Twilio status callback's
    form fields as they are (a dict: the `twilio` format)."""
    now = datetime.now(UTC)
    event_id = uuid.uuid4()
    if isinstance(data, dict):
        payload: dict[str, Any] = dict(data)
        event_format = "twilio"
    else:
        payload = {
            "id": str(event_id),
            "type": event_type.value,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": data.model_dump(mode="json", by_alias=True),
        }
        event_format = "standard"
    event = WebhookEvent(
        id=event_id,
        type=event_type.value,
        client_id=endpoint.client_id,
        endpoint_id=endpoint.id,
        message_id=message_id,
        ordering_key=ordering_key,
        payload=payload,
        format=event_format,
        status=EventStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(event)
    await session.flush()
    schedule(session, EventJob(event_id))
    return event


# Whether a message can have an event to write when its status changes (`{m}`: the messages
# table's alias in the query): its client's, with a callback URL of its own or a default
# endpoint of the client's. Most clients of a busy sender have neither, and asking message by
# message would cost two queries each; state changes ask it in their own statement.
MAY_NOTIFY_SQL: Final = """({m}.client_id IS NOT NULL AND ({m}.callback_url IS NOT NULL OR EXISTS (
    SELECT 1 FROM webhook_endpoints AS endpoint
    WHERE endpoint.client_id = {m}.client_id AND endpoint.is_default
)))"""


async def emit_message_statuses(session: AsyncSession, messages: Sequence[Message]) -> None:
    """`emit_message_status` for messages that just moved, after finding in one query which of
    them can have an event (`MAY_NOTIFY_SQL`)."""
    ids = [m.id for m in messages if m.client_id is not None]
    if not ids:
        return
    notify = set(
        await session.scalars(
            text(
                "SELECT m.id FROM messages AS m WHERE m.id = ANY(CAST(:ids AS uuid[])) AND "
                + MAY_NOTIFY_SQL.format(m="m")
            ),
            {"ids": ids},
        )
    )
    for message in messages:
        if message.id in notify:
            await emit_message_status(session, message.id)


async def emit_message_status(session: AsyncSession, message_id: uuid.UUID) -> None:
    """The message just moved to a new status (in this transaction): tell its client.

    Call it after the UPDATE that changed the status: the UPDATE locks the message row, so a
    message's events are written (and numbered) in the order its status changed.
    """
    message = await session.get(Message, message_id, populate_existing=True)
    if message is None or message.client_id is None:
        return  # the service's own messages (keyword replies) have no client to tell
    event_type = MESSAGE_EVENTS.get(MessageStatus(message.status))
    if event_type is None:
        return
    owner = Owner(client_id=message.client_id)
    if message.callback_url:
        endpoint: WebhookEndpoint | None = await _endpoint_for_url(
            session, owner, message.callback_url
        )
    else:
        endpoint = await default_endpoint(session, owner)
    if endpoint is None:
        return
    if message.api == "twilio" and message.callback_url:
        # Its StatusCallback: Twilio's form fields, signed as Twilio signs them.
        await _write(
            session,
            endpoint,
            event_type,
            callback_params(message),
            ordering_key=f"message:{message.id}",
            message_id=message.id,
        )
        return
    data = MessageData(
        id=message.id,
        status=MessageStatus(message.status),
        to=message.to,
        from_=message.from_,
        body=message.body,
        encoding=message.encoding,
        segments=message.segments,
        provider=message.provider,
        provider_message_id=message.provider_message_id,
        error_code=message.error_code,
        error_message=message.error_message,
        metadata=message.metadata_,
        created_at=message.created_at,
        updated_at=message.updated_at,
    )
    await _write(
        session,
        endpoint,
        event_type,
        data,
        ordering_key=f"message:{message.id}",
        message_id=message.id,
    )


async def emit_inbound_received(session: AsyncSession, inbound_id: uuid.UUID) -> None:
    """A customer's message that matched no keyword was stored: tell its sender's endpoint."""
    inbound = await session.get(InboundMessage, inbound_id)
    if inbound is None or inbound.sender_id is None:
        return
    endpoint = await default_endpoint(session, Owner(sender_id=inbound.sender_id))
    if endpoint is None:
        return
    data = InboundData(
        id=inbound.id,
        sender_id=inbound.sender_id,
        to=inbound.to,
        from_=inbound.from_,
        body=inbound.body,
        num_segments=inbound.num_segments,
        provider=inbound.provider,
        provider_message_id=inbound.provider_message_id,
        created_at=inbound.created_at,
    )
    await _write(
        session,
        endpoint,
        EventType.INBOUND_RECEIVED,
        data,
        ordering_key=f"inbound:{inbound.sender_id}:{inbound.from_}"[:80],
    )


async def emit_opt_out_changed(
    session: AsyncSession,
    *,
    phone: str,
    sender_id: uuid.UUID | None,
    action: str,
    source: str,
    actor: str | None,
    detail: str | None,
) -> None:
    """A number's opt-out state changed: tell the sender's endpoint (every sender's, for a
    service-wide change). A service-wide change reaches senders that other clients own: it
    carries neither its detail (it may name the sender the keyword came to) nor who made it,
    unless that was the recipient or a provider, as `GET /v1/opt-outs` shows it to clients."""
    endpoints = await default_sender_endpoints(session, sender_id)
    if not endpoints:
        return
    if sender_id is None:
        detail = None
        actor = actor if is_public_actor(actor) else None
    data = OptOutData(
        phone=phone,
        sender_id=sender_id,
        opted_out=action == "opt_out",
        action=action,
        source=source,
        actor=actor,
        detail=detail,
        changed_at=datetime.now(UTC),
    )
    for endpoint in endpoints:
        await _write(
            session, endpoint, EventType.OPT_OUT_CHANGED, data, ordering_key=f"opt_out:{phone}"
        )


async def emit_pumping_suspected(session: AsyncSession, data: PumpingData) -> None:
    """The pumping alarm fired for one of a client's ranges: tell the client's default endpoint
    (none: the metric and the log line are the record; admins see every event written)."""
    endpoint = await default_endpoint(session, Owner(client_id=data.client_id))
    if endpoint is None:
        return
    await _write(
        session,
        endpoint,
        EventType.TRAFFIC_PUMPING_SUSPECTED,
        data,
        ordering_key=f"pumping:{data.client_id}:{data.range}"[:80],
    )


def is_public_actor(actor: str | None) -> bool:
    """Whether anyone may be told who made an opt-out change: the recipient (a keyword) or a
    provider (an error), never a client or an operator."""
    return actor == "recipient" or (actor or "").startswith("provider:")


# ---- Reading and redelivering ----


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Filters for listing events; all optional."""

    type: EventType | None = None
    status: EventStatus | None = None
    message_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class EventView:
    """An event with the URL it goes to."""

    event: WebhookEvent
    url: str


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of events, newest first."""

    items: list[EventView]
    next_cursor: str | None


def _visible(principal: Principal) -> ColumnElement[bool]:
    # Admin keys see every event (senders' events belong to no client); a client its own.
    return true() if principal.is_admin else WebhookEvent.client_id == principal.client_id


async def list_events(
    session: AsyncSession,
    principal: Principal,
    filters: EventFilter,
    *,
    limit: int,
    cursor: str | None,
) -> EventPage:
    """A page of the events the caller may see, newest first."""
    query = (
        select(WebhookEvent, WebhookEndpoint.url)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookEvent.endpoint_id)
        .where(_visible(principal))
    )
    if filters.type is not None:
        query = query.where(WebhookEvent.type == filters.type.value)
    if filters.status is not None:
        query = query.where(WebhookEvent.status == filters.status.value)
    if filters.message_id is not None:
        query = query.where(WebhookEvent.message_id == filters.message_id)
    if cursor is not None:
        created_at, seq = decode_cursor(cursor, int)
        query = query.where(
            or_(
                WebhookEvent.created_at < created_at,
                and_(WebhookEvent.created_at == created_at, WebhookEvent.seq < seq),
            )
        )
    rows = list(
        await session.execute(
            query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.seq.desc()).limit(limit + 1)
        )
    )
    items = [EventView(event, url) for event, url in rows[:limit]]
    last = items[-1].event if items else None
    has_more = len(rows) > limit and last is not None
    return EventPage(
        items=items,
        next_cursor=encode_cursor(last.created_at, last.seq) if has_more and last else None,
    )


async def get_event(
    session: AsyncSession, principal: Principal, event_id: uuid.UUID, *, lock: bool = False
) -> EventView:
    """One event the caller may see, or `NotFound`."""
    query = (
        select(WebhookEvent, WebhookEndpoint.url)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookEvent.endpoint_id)
        .where(WebhookEvent.id == event_id, _visible(principal))
        .execution_options(populate_existing=True)
    )
    if lock:
        query = query.with_for_update(of=WebhookEvent)
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise NotFound("event_not_found", f"no event with id {event_id}")
    return EventView(row[0], row[1])


async def list_attempts(
    session: AsyncSession, principal: Principal, event_id: uuid.UUID
) -> list[WebhookAttempt]:
    """Every delivery attempt of an event, oldest first."""
    await get_event(session, principal, event_id)
    return list(
        await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == event_id)
            .order_by(WebhookAttempt.id)
        )
    )


async def redeliver(session: AsyncSession, principal: Principal, event_id: uuid.UUID) -> EventView:
    """Send a delivered or failed event again, now, with a fresh retry window.

    Refused (409) while it is still pending, and while its endpoint is disabled (enable it
    first). The same event id is sent again: receivers that already have it ignore it.
    """
    view = await get_event(session, principal, event_id, lock=True)
    event = view.event
    if event.status == EventStatus.PENDING.value:
        raise Conflict("event_pending", "the event is still being delivered; wait for it to finish")
    endpoint = await session.get(WebhookEndpoint, event.endpoint_id, populate_existing=True)
    if endpoint is not None and endpoint.disabled_at is not None:
        raise Conflict(
            "endpoint_disabled",
            f"the endpoint {endpoint.url} is disabled ({endpoint.disabled_reason}); enable it "
            f"with POST /v1/event-endpoints/{endpoint.id}/enable first",
        )
    event.status = EventStatus.PENDING.value
    event.next_attempt_at = datetime.now(UTC)
    event.retry_until = None  # a new window from the next attempt
    event.in_flight_until = None
    event.delivered_at = None
    await session.flush()
    await session.refresh(event, ["updated_at"])
    # Its own job id: an earlier job for this event, still deferred, must not absorb it.
    schedule(session, EventJob(event.id, tag=f"redeliver-{event.attempts}"))
    return view
