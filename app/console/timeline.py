"""One message as the console shows it: its facts and everything that happened to it, in time
order, from its history (`message_events`: accepted, each attempt and decision, providers'
answers, callbacks, reconciliation and status lookups), its parts (`message_parts`) and the
events sent to its client (`webhook_events`) with each delivery attempt (`webhook_attempts`).

The body is not part of it unless asked for (`with_body`), and it is hidden in the payloads
shown too (a provider's answer or an event may quote it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import (
    Client,
    Message,
    MessageEvent,
    MessagePart,
    Sender,
    WebhookAttempt,
    WebhookEvent,
)

HIDDEN: Final = "[body hidden]"
# Keys under which payloads carry a message's text (ours, Twilio's, Vonage's).
_BODY_KEYS: Final = frozenset({"body", "Body", "text"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing that happened, at `at`."""

    at: datetime
    kind: str  # history, part, event, attempt
    title: str
    badge: str | None
    facts: list[tuple[str, str]]
    payload: str | None


@dataclass(frozen=True, slots=True)
class MessageView:
    """A message, its timeline, and its body when asked for (None: hidden)."""

    message: Message
    client: str | None
    sender: str
    entries: list[Entry]
    body: str | None


def _hidden(value: Any, body: str) -> Any:
    """`value` (a JSON payload) with the message's text taken out."""
    if isinstance(value, dict):
        return {
            key: HIDDEN if key in _BODY_KEYS and item else _hidden(item, body)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_hidden(item, body) for item in value]
    if isinstance(value, str) and body and body in value:
        return value.replace(body, HIDDEN)
    return value


def _payload(value: Any, body: str) -> str | None:
    if value is None:
        return None
    return json.dumps(_hidden(value, body), indent=2, sort_keys=True, ensure_ascii=False)


def _facts(**values: object) -> list[tuple[str, str]]:
    return [(name.replace("_", " "), str(value)) for name, value in values.items() if value]


def _history(event: MessageEvent, body: str) -> Entry:
    if event.applied:
        title = f"Status: {event.status}"
    else:
        title = f"Noted: {event.status or event.provider_status or 'no change'} (status unchanged)"
    return Entry(
        at=event.created_at,
        kind="history",
        title=title,
        badge=event.status if event.applied else None,
        facts=_facts(
            source=event.source,
            provider_status=event.provider_status,
            error=event.error_code,
            detail=event.detail,
        ),
        payload=_payload(event.payload, body),
    )


def _parts(part: MessagePart) -> list[Entry]:
    place = f"{part.number or '?'}/{part.total or '?'}"
    entries = [
        Entry(
            part.created_at,
            "part",
            f"Part {place} accepted by the provider",
            None,
            _facts(provider_id=part.provider_message_id),
            None,
        )
    ]
    if part.status is not None:
        entries.append(
            Entry(
                part.updated_at,
                "part",
                f"Part {place}: {part.status}",
                part.status,
                _facts(
                    provider_status=part.provider_status,
                    error=part.error_code,
                    error_message=part.error_message,
                ),
                None,
            )
        )
    return entries


def _event(event: WebhookEvent, body: str) -> Entry:
    return Entry(
        at=event.created_at,
        kind="event",
        title=f"Event to the client: {event.type} ({event.status})",
        badge=event.status,
        facts=_facts(
            event_id=event.id,
            format=event.format,
            attempts=event.attempts,
            last_error=event.last_error,
            delivered_at=event.delivered_at,
        ),
        payload=_payload(event.payload, body),
    )


def _attempt(attempt: WebhookAttempt, event_type: str) -> Entry:
    answer = attempt.response_status or attempt.error_code or ""
    return Entry(
        at=attempt.created_at,
        kind="attempt",
        title=f"Delivery attempt {attempt.number} of {event_type}: {attempt.status} {answer}",
        badge=attempt.status,
        facts=_facts(
            url=attempt.url,
            address=attempt.address,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            response=attempt.response_body,
        ),
        payload=None,
    )


async def message_view(
    session: AsyncSession, message_id: uuid.UUID, *, with_body: bool
) -> MessageView | None:
    """The message and its timeline (None: no such message)."""
    row = (
        await session.execute(
            select(Message, Client.name, Sender.address)
            .join(Sender, Sender.id == Message.sender_id)
            .outerjoin(Client, Client.id == Message.client_id)
            .where(Message.id == message_id)
        )
    ).one_or_none()
    if row is None:
        return None
    message, client, sender = row
    body = message.body
    # Each read in time order, then in the order written (rows of one transaction share its
    # `now()`): the merge below is a stable sort, so ties keep this order.
    history = await session.scalars(
        select(MessageEvent)
        .where(MessageEvent.message_id == message_id)
        .order_by(MessageEvent.created_at, MessageEvent.id)
    )
    parts = await session.scalars(
        select(MessagePart)
        .where(MessagePart.message_id == message_id)
        .order_by(MessagePart.created_at, MessagePart.number, MessagePart.provider_message_id)
    )
    events = list(
        await session.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.message_id == message_id)
            .order_by(WebhookEvent.created_at, WebhookEvent.seq)
        )
    )
    attempts = await session.execute(
        select(WebhookAttempt, WebhookEvent.type)
        .join(WebhookEvent, WebhookEvent.id == WebhookAttempt.event_id)
        .where(WebhookEvent.message_id == message_id)
        .order_by(WebhookAttempt.created_at, WebhookAttempt.id)
    )
    entries = [
        *(_history(event, body) for event in history),
        *(entry for part in parts for entry in _parts(part)),
        *(_event(event, body) for event in events),
        *(_attempt(attempt, event_type) for attempt, event_type in attempts),
    ]
    order = {"history": 0, "part": 1, "event": 2, "attempt": 3}
    entries.sort(key=lambda entry: (entry.at, order[entry.kind]))
    shown = body if with_body and message.body_redacted_at is None else None
    return MessageView(message, client, sender, entries, shown)
