"""Inbound messages: store each once, match keywords, record opt-outs and opt-ins, reply.

Providers retry webhooks, so an inbound message is inserted with ON CONFLICT DO NOTHING on
(provider, provider message id) and acted on only by the request that inserted it. Replies are
ordinary outbound messages (queued, enqueued after commit, tracked to a status), owned by no client.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.consent.optouts import OptAction, OptChange, OptSource, is_opted_out, record_change
from app.db.models import InboundMessage, InboundPart, Sender
from app.events.outbox import emit_inbound_received
from app.kernel.metrics import INBOUND_MESSAGES
from app.kernel.phone import canonical_phone
from app.kernel.text import storable, storable_mapping
from app.providers.base import InboundSms
from app.senders.keywords import (
    KeywordCategory,
    KeywordConfig,
    KeywordMatch,
    match_keyword,
    reply_text,
)
from app.senders.service import find_sender_by_address, owned_sender_ids
from app.sending.accept import queue_reply

log = logging.getLogger(__name__)

# Messages come in at most 255 parts (the concatenation header counts them in one byte).
MAX_PARTS = 255

# The kind of outbound message each keyword category answers with.
REPLY_KINDS = {
    KeywordCategory.OPT_OUT: "opt_out_confirmation",
    KeywordCategory.OPT_IN: "opt_in_confirmation",
    KeywordCategory.HELP: "help_reply",
    KeywordCategory.CUSTOM: "keyword_reply",
}


@dataclass(frozen=True, slots=True)
class InboundOutcome:
    """What receiving one webhook did."""

    inbound_id: uuid.UUID | None  # None: a duplicate, or a part still waiting for the others
    duplicate: bool = False
    reply_message_id: uuid.UUID | None = None


async def receive_inbound(
    session: AsyncSession,
    provider: str,
    inbound: InboundSms,
    *,
    default_region: str,
    opt_out_scope: str,
) -> InboundOutcome:
    """Store an inbound message (once), act on a keyword, and queue the reply if one is due."""
    inbound = _storable(inbound)
    part_ids: list[str] = []
    if inbound.part is not None:
        assembled = await _assemble(session, provider, inbound)
        if assembled is None:
            return InboundOutcome(inbound_id=None)
        inbound, part_ids = assembled
    # Keywords act only on a number we can write the way sends write it (E.164), so an opt-out
    # recorded for it is one that sends to that number will find.
    customer = canonical_phone(inbound.from_, default_region)
    sender = await find_sender_by_address(session, inbound.to, default_region)
    match = None
    if sender is not None:
        match = match_keyword(KeywordConfig.model_validate(sender.keywords), inbound.body)
    inbound_id = await _store(session, provider, inbound, sender, customer, match)
    if part_ids:
        await _mark_assembled(session, provider, inbound.provider_message_id, part_ids)
    if inbound_id is None:
        return InboundOutcome(inbound_id=None, duplicate=True)
    INBOUND_MESSAGES.labels(
        provider=provider, keyword_category=match.category.value if match else "none"
    ).inc()
    if sender is None:
        log.info("inbound message to an unknown address", extra={"to": inbound.to})
        return InboundOutcome(inbound_id=inbound_id)
    if match is None:  # events out: the sender's endpoint gets what is not a keyword
        await emit_inbound_received(session, inbound_id)
    if match is None or customer is None:
        return InboundOutcome(inbound_id=inbound_id)
    reply_id = await _act_on_keyword(session, sender, customer, match, opt_out_scope)
    if reply_id is not None:
        await session.execute(
            update(InboundMessage)
            .where(InboundMessage.id == inbound_id)
            .values(reply_message_id=reply_id)
        )
    return InboundOutcome(inbound_id=inbound_id, reply_message_id=reply_id)


async def _store(
    session: AsyncSession,
    provider: str,
    inbound: InboundSms,
    sender: Sender | None,
    customer: str | None,
    match: KeywordMatch | None,
) -> uuid.UUID | None:
    """Insert the message; None when the provider's id was stored already (a redelivery)."""
    return await session.scalar(
        insert(InboundMessage)
        .values(
            id=uuid.uuid4(),
            provider=provider,
            provider_message_id=inbound.provider_message_id,
            sender_id=sender.id if sender else None,
            to=inbound.to,
            from_=customer or inbound.from_,
            body=inbound.body,
            num_segments=inbound.num_segments,
            keyword=match.keyword if match else None,
            keyword_category=match.category.value if match else None,
            language=match.language if match else None,
            payload=dict(inbound.raw),
        )
        .on_conflict_do_nothing(constraint="uq_inbound_provider_message")
        .returning(InboundMessage.id)
    )


async def _act_on_keyword(
    session: AsyncSession, sender: Sender, customer: str, match: KeywordMatch, opt_out_scope: str
) -> uuid.UUID | None:
    """Apply the keyword; return the id of the reply message, if one is due."""
    if match.category in (KeywordCategory.OPT_OUT, KeywordCategory.OPT_IN):
        action = (
            OptAction.OPT_OUT if match.category is KeywordCategory.OPT_OUT else OptAction.OPT_IN
        )
        result = await record_change(
            session,
            OptChange(
                phone=customer,
                sender_id=None if opt_out_scope == "service" else sender.id,
                action=action,
                source=OptSource.KEYWORD,
                actor="recipient",
                detail=f"{match.keyword} to {sender.address}",
            ),
            seen_from=sender.id,
            # START or YES from a number that is not opted out changes nothing: no row (YES is
            # a common answer to any message, so it must not leave a trace or get a reply).
            skip_unchanged=action is OptAction.OPT_IN,
        )
        # One confirmation per change the customer made: a repeated STOP (or START) gets none.
        # A state set by someone else (the API, an import, a provider) was never confirmed to
        # the customer, so their own STOP is; an opt-in that changed nothing is never answered.
        if not result.changed and (
            action is OptAction.OPT_IN or result.previous_source == OptSource.KEYWORD
        ):
            return None
    elif match.category is KeywordCategory.CUSTOM and await is_opted_out(
        session, customer, sender.id
    ):
        return None  # custom replies are not compliance messages: never to an opted-out number
    config = KeywordConfig.model_validate(sender.keywords)
    body = reply_text(config, match)
    return await queue_reply(
        session,
        sender_id=sender.id,
        from_=sender.address,
        provider=sender.provider,
        to=customer,
        body=body,
        kind=REPLY_KINDS[match.category],
    )


def _storable(inbound: InboundSms) -> InboundSms:
    """The message cut to our columns: whatever a customer typed is kept, but PostgreSQL holds
    no NUL, and counts beyond what a real message has are not counts (nothing is refused, or
    the provider would retry it forever)."""
    part = inbound.part
    if part is not None and not 1 <= part.number <= part.total <= MAX_PARTS:
        part = None  # not a part we can place: keep it as a message of its own
    if part is not None:
        part = replace(part, reference=storable(part.reference)[:64])
    segments = inbound.num_segments
    return replace(
        inbound,
        provider_message_id=storable(inbound.provider_message_id)[:128],
        from_=storable(inbound.from_)[:32],
        to=storable(inbound.to)[:32],
        body=storable(inbound.body),
        num_segments=segments if segments is not None and 1 <= segments <= MAX_PARTS else None,
        part=part,
        raw=storable_mapping(inbound.raw),
    )


async def _assemble(
    session: AsyncSession, provider: str, inbound: InboundSms
) -> tuple[InboundSms, list[str]] | None:
    """Store one part; once every part is in, the whole message and its parts' ids."""
    part = inbound.part
    assert part is not None
    group = (
        InboundPart.provider == provider,
        InboundPart.from_ == inbound.from_,
        InboundPart.to == inbound.to,
        InboundPart.reference == part.reference,
    )
    # Parts of one message may arrive at the same moment: without this lock each request would
    # see only its own uncommitted part and the message would never be assembled.
    await session.execute(
        select(func.pg_advisory_xact_lock(_group_lock(provider, inbound, part.reference)))
    )
    await session.execute(
        insert(InboundPart)
        .values(
            provider=provider,
            provider_message_id=inbound.provider_message_id,
            from_=inbound.from_,
            to=inbound.to,
            reference=part.reference,
            number=part.number,
            total=part.total,
            body=inbound.body,
            payload=dict(inbound.raw),
        )
        .on_conflict_do_nothing()
    )
    pending = await session.scalars(
        select(InboundPart)
        .where(*group, InboundPart.inbound_message_id.is_(None), InboundPart.total == part.total)
        .order_by(InboundPart.number, InboundPart.created_at)
    )
    by_number: dict[int, InboundPart] = {}
    for stored in pending:
        by_number.setdefault(stored.number, stored)
    if set(by_number) != set(range(1, part.total + 1)):
        return None
    ordered = [by_number[number] for number in range(1, part.total + 1)]
    whole = replace(
        inbound,
        # The first part's id names the whole message.
        provider_message_id=ordered[0].provider_message_id,
        body="".join(p.body for p in ordered),
        num_segments=part.total,
        part=None,
        raw={**inbound.raw, "parts": ",".join(p.provider_message_id for p in ordered)},
    )
    return whole, [p.provider_message_id for p in ordered]


async def _mark_assembled(
    session: AsyncSession, provider: str, provider_message_id: str, part_ids: list[str]
) -> None:
    """Tie the parts to their message, so they never join a later message's group."""
    inbound_id = await session.scalar(
        select(InboundMessage.id).where(
            InboundMessage.provider == provider,
            InboundMessage.provider_message_id == provider_message_id,
        )
    )
    await session.execute(
        update(InboundPart)
        .where(InboundPart.provider == provider, InboundPart.provider_message_id.in_(part_ids))
        .values(inbound_message_id=inbound_id)
    )


def _group_lock(provider: str, inbound: InboundSms, reference: str) -> int:
    key = f"parts:{provider}:{inbound.from_}:{inbound.to}:{reference}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class InboundFilter:
    """Filters for listing inbound messages."""

    from_: str | None = None
    sender_id: uuid.UUID | None = None
    keyword_category: KeywordCategory | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    # A client key: only messages to the senders granted to this client.
    client_id: uuid.UUID | None = None


async def list_inbound(
    session: AsyncSession,
    filters: InboundFilter,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[InboundMessage]:
    """Inbound messages, newest first, after the (created_at, id) position `after`."""
    query = select(InboundMessage)
    if filters.client_id is not None:
        query = query.where(InboundMessage.sender_id.in_(owned_sender_ids(filters.client_id)))
    if filters.from_ is not None:
        query = query.where(InboundMessage.from_ == filters.from_)
    if filters.sender_id is not None:
        query = query.where(InboundMessage.sender_id == filters.sender_id)
    if filters.keyword_category is not None:
        query = query.where(InboundMessage.keyword_category == filters.keyword_category.value)
    if filters.created_after is not None:
        query = query.where(InboundMessage.created_at >= filters.created_after)
    if filters.created_before is not None:
        query = query.where(InboundMessage.created_at < filters.created_before)
    if after is not None:
        query = query.where(
            or_(
                InboundMessage.created_at < after[0],
                and_(InboundMessage.created_at == after[0], InboundMessage.id < after[1]),
            )
        )
    query = query.order_by(InboundMessage.created_at.desc(), InboundMessage.id.desc())
    return list(await session.scalars(query.limit(limit)))
