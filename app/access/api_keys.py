"""API keys' life cycle: list, create, revoke, rotate with an overlap, optional expiry.

A key is never deleted: a revoked or expired one stays listed (with its prefix and last use), so
an operator can tell which key a log line or an incident was about. Every API process caches the
keys it has looked up (`app.access.lookups`): a revocation or a rotation is honoured at once by
the process that made it (it forgets its cached keys when the transaction commits) and within
`LOOKUP_CACHE_SECONDS` by every other; an expiry is checked on every use, cached or not.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import create_key
from app.db.models import ApiKey, Client
from app.kernel.errors import Conflict, NotFound, ValidationFailed


@dataclass(frozen=True, slots=True)
class KeyView:
    """A key as listings show it (never its secret)."""

    key: ApiKey
    client_name: str

    @property
    def status(self) -> str:
        """`active`, `revoked` or `expired`."""
        if self.key.revoked_at is not None:
            return "revoked"
        expires = self.key.expires_at
        if expires is not None and expires <= datetime.now(UTC):
            return "expired"
        return "active"


def key_not_found(reference: object) -> NotFound:
    """The error for a key id (or prefix) that names no key."""
    return NotFound("api_key_not_found", f"no API key {reference}")


async def list_keys(session: AsyncSession, client_name: str | None = None) -> list[KeyView]:
    """Every key (or one client's), oldest first: keys are few, a handful per client."""
    query = select(ApiKey, Client.name).join(Client, Client.id == ApiKey.client_id)
    if client_name is not None:
        query = query.where(Client.name == client_name)
    rows = await session.execute(query.order_by(ApiKey.created_at, ApiKey.id))
    return [KeyView(key, name) for key, name in rows.all()]


def _future(expires_at: datetime | None, field: str) -> datetime | None:
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise ValidationFailed.for_field("validation_error", field, "must be in the future")
    return expires_at


async def create(
    session: AsyncSession,
    client_name: str,
    *,
    name: str | None,
    is_admin: bool,
    expires_at: datetime | None,
) -> tuple[str, KeyView]:
    """A new key for the client (created if new): the secret, shown once, and the key."""
    raw_key, key = await create_key(
        session,
        client_name,
        is_admin=is_admin,
        name=name,
        expires_at=_future(expires_at, "expires_at"),
    )
    return raw_key, KeyView(key, client_name)


async def find(session: AsyncSession, reference: str) -> KeyView:
    """A key by id, or by its prefix (as listings show it) when that names exactly one."""
    query = select(ApiKey, Client.name).join(Client, Client.id == ApiKey.client_id)
    try:
        key_id = uuid.UUID(reference)
    except ValueError:
        rows = list((await session.execute(query.where(ApiKey.prefix == reference))).all())
        if len(rows) != 1:
            raise key_not_found(reference) from None
    else:
        rows = list((await session.execute(query.where(ApiKey.id == key_id))).all())
        if not rows:
            raise key_not_found(reference) from None
    key, name = rows[0]
    return KeyView(key, name)


async def revoke(session: AsyncSession, reference: str) -> KeyView:
    """Revoke a key now (revoking it again changes nothing)."""
    view = await find(session, reference)
    if view.key.revoked_at is None:
        view.key.revoked_at = datetime.now(UTC)
        await session.flush()
    return view


async def rotate(
    session: AsyncSession,
    reference: str,
    *,
    overlap: timedelta,
    expires_at: datetime | None = None,
) -> tuple[str, KeyView, KeyView]:
    """A new key in place of an active one (same client, name and rights): the new secret,
    the new key, and the old one, which keeps working for `overlap` (0: stops now), or until
    its own expiry if that comes first."""
    old = await find(session, reference)
    if old.status != "active":
        raise Conflict("api_key_inactive", f"API key {reference} is {old.status}")
    raw_key, new = await create(
        session,
        old.client_name,
        name=old.key.name,
        is_admin=old.key.is_admin,
        expires_at=expires_at,
    )
    ends = datetime.now(UTC) + overlap
    if old.key.expires_at is None or old.key.expires_at > ends:
        old.key.expires_at = ends
    await session.flush()
    return raw_key, new, old
