"""Event endpoints: the URLs events are sent to, and who owns them.

An endpoint belongs to a client or to a sender (its `Owner`), whose signing secrets sign what it
receives:

* a client's **default endpoint** receives the status changes of that client's messages;
* a message's **`callback_url`** receives that message's status changes instead (an endpoint row
  of the client is made for it the first time it is used, and deleted by retention once no event
  uses it: README, "Retention");
* a sender's endpoint (set by an admin) receives the sender's inbound messages that are not
  keywords, and opt-out changes of its recipients. Inbound messages and opt-outs belong to the
  service, not to a client (only admin keys read them), so these events are signed with the
  sender's own secrets, managed by admin keys.

A receiver answering 410 Gone disables its endpoint (`disable`); events for it then fail without
an attempt until it is enabled again, by `enable` or by setting it as the default again.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal
from app.db.models import SigningSecret, WebhookEndpoint
from app.events.destinations import Resolver, check_destination, system_resolver
from app.kernel.errors import NotFound
from app.kernel.settings import EventsSettings
from app.senders.service import get_sender


@dataclass(frozen=True, slots=True)
class Owner:
    """A client or a sender: whose endpoints and secrets."""

    client_id: uuid.UUID | None = None
    sender_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        if (self.client_id is None) == (self.sender_id is None):
            raise ValueError("an owner is a client or a sender")

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> Owner:
        """The owner of an endpoint."""
        return cls(client_id=endpoint.client_id, sender_id=endpoint.sender_id)

    def matches(self, model: type[WebhookEndpoint] | type[SigningSecret]) -> ColumnElement[bool]:
        """A WHERE clause selecting this owner's rows of `model`."""
        if self.client_id is not None:
            return model.client_id == self.client_id
        return model.sender_id == self.sender_id

    def lock_key(self, purpose: str) -> int:
        """An advisory-lock key for changes to this owner's `purpose` (endpoints, secrets)."""
        raw = f"{purpose}:{self.client_id}:{self.sender_id}".encode()
        return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big", signed=True)


async def lock_owner(session: AsyncSession, owner: Owner, purpose: str) -> None:
    """Serialise changes to an owner's endpoints or secrets until the transaction ends."""
    await session.execute(select(func.pg_advisory_xact_lock(owner.lock_key(purpose))))


async def endpoint_for_url(session: AsyncSession, owner: Owner, url: str) -> WebhookEndpoint:
    """The owner's endpoint for `url`, created if new (without changing which is default)."""
    found = await _find(session, owner, url)
    if found is not None:
        return found
    column, where = (
        ("client_id", "client_id IS NOT NULL")
        if owner.client_id is not None
        else ("sender_id", "sender_id IS NOT NULL")
    )
    # Two transactions may meet the same new callback URL at once: one inserts, the other
    # waits for it and then finds its row.
    await session.execute(
        insert(WebhookEndpoint)
        .values(
            id=uuid.uuid4(),
            client_id=owner.client_id,
            sender_id=owner.sender_id,
            url=url,
            is_default=False,
        )
        .on_conflict_do_nothing(index_elements=[column, "url"], index_where=text(where))
    )
    found = await _find(session, owner, url)
    assert found is not None
    return found


async def _find(session: AsyncSession, owner: Owner, url: str) -> WebhookEndpoint | None:
    # FOR KEY SHARE, the lock the event's foreign key takes anyway, taken now: retention
    # (`app.db.retention`) skips an endpoint an event is being written for, and an endpoint
    # it is deleting is not found (then made again).
    endpoint: WebhookEndpoint | None = await session.scalar(
        select(WebhookEndpoint)
        .where(owner.matches(WebhookEndpoint), WebhookEndpoint.url == url)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    return endpoint


async def default_endpoint(session: AsyncSession, owner: Owner) -> WebhookEndpoint | None:
    """The owner's default endpoint, if it has one."""
    endpoint: WebhookEndpoint | None = await session.scalar(
        select(WebhookEndpoint).where(
            owner.matches(WebhookEndpoint), WebhookEndpoint.is_default.is_(True)
        )
    )
    return endpoint


async def default_sender_endpoints(
    session: AsyncSession, sender_id: uuid.UUID | None
) -> list[WebhookEndpoint]:
    """The default endpoint of one sender, or of every sender when `sender_id` is None."""
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.sender_id.is_not(None), WebhookEndpoint.is_default.is_(True)
    )
    if sender_id is not None:
        query = query.where(WebhookEndpoint.sender_id == sender_id)
    return list(await session.scalars(query.order_by(WebhookEndpoint.created_at)))


async def set_default(session: AsyncSession, owner: Owner, url: str) -> WebhookEndpoint:
    """Make `url` (already checked) the owner's default endpoint, enabled."""
    await lock_owner(session, owner, "endpoints")
    await session.execute(
        update(WebhookEndpoint)
        .where(
            owner.matches(WebhookEndpoint),
            WebhookEndpoint.is_default.is_(True),
            WebhookEndpoint.url != url,
        )
        .values(is_default=False)
    )
    endpoint = await endpoint_for_url(session, owner, url)
    endpoint.is_default = True
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    await session.flush()
    await session.refresh(endpoint, ["updated_at"])
    return endpoint


async def configure_default(
    session: AsyncSession,
    owner: Owner,
    url: str,
    settings: EventsSettings,
    resolver: Resolver = system_resolver,
) -> WebhookEndpoint:
    """Check `url` (422 naming `url` when it is not a destination we send to) and make it the
    owner's default endpoint. The check (a DNS lookup) comes before the session's first
    statement, so no transaction is open while it waits; for a sender, the sender is then
    looked up (404 when unknown)."""
    await check_destination(url, settings, field="url", resolver=resolver)
    if owner.sender_id is not None:
        await get_sender(session, owner.sender_id)
    return await set_default(session, owner, url)


async def clear_default(session: AsyncSession, owner: Owner) -> None:
    """The owner has no default endpoint any more (events already written still go out)."""
    await lock_owner(session, owner, "endpoints")
    await session.execute(
        update(WebhookEndpoint)
        .where(owner.matches(WebhookEndpoint), WebhookEndpoint.is_default.is_(True))
        .values(is_default=False)
    )


async def list_endpoints(
    session: AsyncSession,
    principal: Principal,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[WebhookEndpoint]:
    """The caller's endpoints, oldest first, after the (created_at, id) `after`; admin keys also
    see every sender's. Each part is read in its index's order (the client's, the senders')."""

    def part(owned: ColumnElement[bool]) -> Select[Any]:
        query = select(WebhookEndpoint).where(owned)
        if after is not None:
            query = query.where(
                tuple_(WebhookEndpoint.created_at, WebhookEndpoint.id) > tuple_(*after)
            )
        return query.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id).limit(limit)

    own: list[WebhookEndpoint] = list(
        await session.scalars(part(WebhookEndpoint.client_id == principal.client_id))
    )
    if not principal.is_admin:
        return own
    senders: list[WebhookEndpoint] = list(
        await session.scalars(part(WebhookEndpoint.sender_id.is_not(None)))
    )
    return sorted(own + senders, key=lambda endpoint: (endpoint.created_at, endpoint.id))[:limit]


async def get_endpoint(
    session: AsyncSession, principal: Principal, endpoint_id: uuid.UUID
) -> WebhookEndpoint:
    """One endpoint the caller may manage, or `NotFound`."""
    endpoint = await session.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    visible = endpoint is not None and (
        endpoint.client_id == principal.client_id
        or (principal.is_admin and endpoint.sender_id is not None)
    )
    if endpoint is None or not visible:
        raise NotFound("endpoint_not_found", f"no event endpoint with id {endpoint_id}")
    return endpoint


async def enable(
    session: AsyncSession, principal: Principal, endpoint_id: uuid.UUID
) -> WebhookEndpoint:
    """Send to a disabled endpoint again (events that failed meanwhile can be redelivered)."""
    endpoint = await get_endpoint(session, principal, endpoint_id)
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    await session.flush()
    await session.refresh(endpoint, ["updated_at"])
    return endpoint


async def disable(session: AsyncSession, endpoint_id: uuid.UUID, reason: str) -> None:
    """Stop sending to an endpoint (its receiver answered 410 Gone)."""
    await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=datetime.now(UTC), disabled_reason=reason)
    )
