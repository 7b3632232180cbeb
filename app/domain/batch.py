"""Accepting many messages in one request (`POST /v1/messages/batch`).

Each message gets the checks `accept_message` makes, in the same order and with the same errors:
its callback URL, the segment limit, its sender, the sender's keyword replies, the recipient's
opt-out. A refused message does not refuse the others: its error takes its place in the results.

What a single send does per message, a batch does once where it can, so that most of a batch's
cost is the rows it writes: each distinct body is measured once, each distinct sender resolved
(and its replies checked) once, every (recipient, sender) pair's opt-out state read in one query,
and the messages and their first history rows written with one INSERT each, without ORM objects.
It logs one line per batch, with its counts, where single sends log one per message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Integer, String, cast, func, insert, literal, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.type_api import TypeEngine

from app.db.models import Message, Sender
from app.domain.auth import Principal
from app.domain.destinations import check_destination
from app.domain.encoding import BodyAnalysis
from app.domain.keywords import KeywordConfig, missing_replies
from app.domain.messages import (
    ENQUEUE_AFTER_COMMIT,
    SendCommand,
    check_body,
    first_history_rows,
)
from app.domain.optouts import opted_out_pairs
from app.domain.senders import resolve_sender
from app.domain.status import MessageStatus
from app.errors import PolicyRefusal, ServiceError
from app.metrics import count_status
from app.settings import EventsSettings

log = logging.getLogger(__name__)

Judged = tuple[SendCommand, BodyAnalysis, Sender]
"""A message that passed every check but the opt-out one, with its body's analysis and sender."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """Per message, in request order: the values it was stored with (named as `Message`'s
    attributes, so `MessageOut` reads them as it reads a row) or the error that refused it."""

    results: list[dict[str, Any] | ServiceError]
    accepted: int


async def accept_batch(
    session: AsyncSession,
    principal: Principal,
    items: Sequence[SendCommand | ServiceError],
    *,
    max_segments: int,
    default_region: str,
    accept_default_replies: bool,
    events: EventsSettings,
    log_bodies: bool = False,
) -> BatchOutcome:
    """Store every acceptable message as `queued` and schedule its delivery after commit.

    `items` are the request's messages, already validated one by one: an error there (a bad
    number, an unknown field) is that message's result, and the rest are judged here.
    """
    urls = {item.callback_url for item in items if isinstance(item, SendCommand)}
    refused_urls = await _refused_callbacks({url for url in urls if url}, events)
    # Answers kept for the batch: messages repeat bodies and senders far more than they differ.
    analyses: dict[str, BodyAnalysis | ServiceError] = {}
    senders: dict[str | None, Sender | ServiceError] = {}
    not_ready: dict[uuid.UUID, ServiceError | None] = {}

    async def judge(command: SendCommand) -> Judged | ServiceError:
        """`accept_message`'s checks before the opt-out one, in its order."""
        if command.callback_url in refused_urls:
            return refused_urls[command.callback_url]
        if command.body not in analyses:
            analyses[command.body] = _measure(command.body, max_segments)
        analysis = analyses[command.body]
        if isinstance(analysis, ServiceError):
            return analysis
        if command.sender not in senders:
            senders[command.sender] = await _resolve(
                session, principal, command.sender, default_region
            )
        sender = senders[command.sender]
        if isinstance(sender, ServiceError):
            return sender
        if sender.id not in not_ready:
            not_ready[sender.id] = _keywords_incomplete(sender, accept_default_replies)
        refusal = not_ready[sender.id]
        return refusal if refusal is not None else (command, analysis, sender)

    judged = [item if isinstance(item, ServiceError) else await judge(item) for item in items]
    opted_out = await opted_out_pairs(
        session,
        {(c.to, s.id) for c, _, s in (j for j in judged if not isinstance(j, ServiceError))},
    )
    now = datetime.now(UTC)
    results: list[dict[str, Any] | ServiceError] = []
    rows: list[dict[str, Any]] = []
    for judgement in judged:
        if isinstance(judgement, ServiceError):
            results.append(judgement)
            continue
        command, analysis, sender = judgement
        if (command.to, sender.id) in opted_out:
            results.append(
                PolicyRefusal(
                    "recipient_opted_out",
                    f"{command.to} has opted out of messages from {sender.address}",
                )
            )
            continue
        row = _message_row(principal.client_id, sender, command, analysis, now)
        results.append(row)
        rows.append(row)
    await _insert(session, rows, principal.client_id, now)

    session.info.setdefault(ENQUEUE_AFTER_COMMIT, []).extend(row["id"] for row in rows)
    for (provider, address), amount in Counter((r["provider"], r["from_"]) for r in rows).items():
        count_status(MessageStatus.QUEUED.value, provider, address, amount)
    refused = Counter(result.code for result in results if isinstance(result, ServiceError))
    log.info(
        "batch processed",
        extra={"accepted": len(rows), "rejected": len(items) - len(rows), "refused": dict(refused)},
    )
    if log_bodies:  # opted into by the operator (LOG_MESSAGE_BODIES), as for single sends
        for row in rows:
            log.info("message body", extra={"message_id": str(row["id"]), "body": row["body"]})
    return BatchOutcome(results=results, accepted=len(rows))


async def _refused_callbacks(urls: set[str], events: EventsSettings) -> dict[str, ServiceError]:
    """The callback URLs we will not call, each checked once (DNS lookups run concurrently)."""

    async def check(url: str) -> ServiceError | None:
        try:
            await check_destination(url, events, field="callback_url")
        except ServiceError as error:
            return error
        return None

    checked = await asyncio.gather(*(check(url) for url in urls))
    return {url: error for url, error in zip(urls, checked, strict=True) if error is not None}


def _measure(body: str, max_segments: int) -> BodyAnalysis | ServiceError:
    try:
        return check_body(body, max_segments)
    except ServiceError as error:
        return error


async def _resolve(
    session: AsyncSession, principal: Principal, address: str | None, default_region: str
) -> Sender | ServiceError:
    try:
        return await resolve_sender(session, address, principal.default_sender_id, default_region)
    except ServiceError as error:
        return error


def _keywords_incomplete(sender: Sender, accept_default_replies: bool) -> ServiceError | None:
    """The refusal `accept_message` gives for a sender whose keyword replies are missing."""
    missing = missing_replies(
        KeywordConfig.model_validate(sender.keywords), accept_defaults=accept_default_replies
    )
    if not missing:
        return None
    return PolicyRefusal(
        "sender_keywords_incomplete",
        f"sender {sender.address} cannot send until its keyword replies are configured; "
        f"missing: {', '.join(missing)}",
    )


def _message_row(
    client_id: uuid.UUID,
    sender: Sender,
    command: SendCommand,
    analysis: BodyAnalysis,
    now: datetime,
) -> dict[str, Any]:
    """The values `queue_message` gives a client's message, as `MessageOut` reads them."""
    validity = command.validity_period
    return {
        "id": uuid.uuid4(),
        "client_id": client_id,
        "sender_id": sender.id,
        "kind": "regular",
        "to": command.to,
        "from_": sender.address,
        "body": command.body,
        "encoding": analysis.encoding.value,
        "segments": analysis.segments,
        "status": MessageStatus.QUEUED.value,
        "provider": sender.provider,
        "provider_message_id": None,
        "error_code": None,
        "error_message": None,
        "callback_url": command.callback_url,
        "metadata_": command.metadata,
        "validity_period": validity,
        "expires_at": now + timedelta(seconds=validity) if validity else None,
        "created_at": now,
        "updated_at": now,
    }


def _array(values: list[Any], item_type: TypeEngine[Any]) -> Any:
    return literal(values, ARRAY(item_type))


async def _insert(
    session: AsyncSession, rows: list[dict[str, Any]], client_id: uuid.UUID, now: datetime
) -> None:
    """Insert the messages and their first history rows: one INSERT ... SELECT FROM unnest(...)
    per table. One statement with one array per column is a single round trip with a fixed,
    cached SQL text; a list of parameter dicts would be executed once per row by asyncpg, and a
    1,000-row VALUES list takes longer to compile than to run."""
    if not rows:
        return
    at = literal(now, DateTime(timezone=True))  # typed: a naive timestamp would shift by TimeZone
    ids = [row["id"] for row in rows]
    given = (
        func.unnest(
            _array(ids, UUID()),
            _array([row["sender_id"] for row in rows], UUID()),
            _array([row["to"] for row in rows], String()),
            _array([row["from_"] for row in rows], String()),
            _array([row["body"] for row in rows], String()),
            _array([row["encoding"] for row in rows], String()),
            _array([row["segments"] for row in rows], Integer()),
            _array([row["provider"] for row in rows], String()),
            _array([row["callback_url"] for row in rows], String()),
            _array([json.dumps(row["metadata_"]) for row in rows], String()),
            _array([row["validity_period"] for row in rows], Integer()),
            _array([row["expires_at"] for row in rows], DateTime(timezone=True)),
        )
        .table_valued(
            "id",
            "sender_id",
            "to",
            "from",
            "body",
            "encoding",
            "segments",
            "provider",
            "callback_url",
            "metadata",
            "validity_period",
            "expires_at",
        )
        .render_derived(name="given")
    )
    c = given.c
    await session.execute(
        insert(Message).from_select(
            [
                Message.id,
                Message.client_id,
                Message.sender_id,
                Message.kind,
                Message.to,
                Message.from_,
                Message.body,
                Message.encoding,
                Message.segments,
                Message.status,
                Message.provider,
                Message.callback_url,
                Message.metadata_,
                Message.validity_period,
                Message.expires_at,
                Message.attempts,
                Message.created_at,
                Message.updated_at,
                Message.next_attempt_at,
            ],
            select(
                c.id,
                literal(client_id, UUID()),
                c.sender_id,
                literal("regular"),
                c.to,
                c["from"],
                c.body,
                c.encoding,
                c.segments,
                literal(MessageStatus.QUEUED.value),
                c.provider,
                c.callback_url,
                cast(c.metadata, JSONB),
                c.validity_period,
                c.expires_at,
                literal(0),
                at,
                at,
                at,
            ),
        )
    )
    queued = func.unnest(_array(ids, UUID())).table_valued("id").render_derived(name="queued")
    await session.execute(first_history_rows(queued.c.id, source="api", at=at))
