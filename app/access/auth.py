"""API keys: random secrets shown once, stored as SHA-256, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import ApiKey, Client
from app.kernel.errors import Unauthorized
from app.kernel.quiet_hours import QuietHours, quiet_hours_of

KEY_PREFIX = "sk_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a client, and whether the key may manage the service."""

    client_id: uuid.UUID
    client_name: str
    default_sender_id: uuid.UUID | None
    is_admin: bool
    key_id: uuid.UUID | None = None
    # The key stops working then, cached or not (a rotation's overlap, or a set expiry).
    expires_at: datetime | None = None
    # The client's own SMS pumping alarm settings, set by an admin (app.traffic.velocity); None:
    # the service's.
    pumping: Mapping[str, Any] | None = None
    # The client's quiet hours (app.kernel.quiet_hours), if an admin set them.
    quiet_hours: QuietHours | None = None

    def expired(self) -> bool:
        """Whether the key's expiry has passed (checked on every use, not only at lookup)."""
        return self.expires_at is not None and self.expires_at <= datetime.now(UTC)


def hash_key(raw_key: str) -> bytes:
    """The stored form of a key. Keys carry 256 random bits, so a fast hash is safe."""
    return hashlib.sha256(raw_key.encode()).digest()


async def create_api_key(
    session: AsyncSession,
    client_name: str,
    *,
    is_admin: bool = False,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> str:
    """Create (or reuse) the client `client_name` and a new key for it; return the raw key."""
    raw_key, _ = await create_key(
        session, client_name, is_admin=is_admin, name=name, expires_at=expires_at
    )
    return raw_key


async def create_key(
    session: AsyncSession,
    client_name: str,
    *,
    is_admin: bool,
    name: str | None,
    expires_at: datetime | None,
) -> tuple[str, ApiKey]:
    """Create (or reuse) the client and a new key for it: the raw key (shown once) and its row."""
    # Made if new, in one statement: two requests making a new client's first keys at once
    # both find it (a read then an insert would let the second fail on the unique name).
    await session.execute(
        insert(Client)
        .values(id=uuid.uuid4(), name=client_name)
        .on_conflict_do_nothing(index_elements=[Client.name])
    )
    client = await session.scalar(select(Client).where(Client.name == client_name))
    assert client is not None  # inserted, or there already
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=uuid.uuid4(),
        client_id=client.id,
        key_hash=hash_key(raw_key),
        prefix=raw_key[:10],
        is_admin=is_admin,
        name=name,
        expires_at=expires_at,
    )
    session.add(key)
    await session.flush()
    await session.refresh(key, ["created_at"])
    return raw_key, key


def api_key_from_header(authorization: str | None) -> str:
    """The raw key of an `Authorization: Bearer <key>` header, or `Unauthorized`."""
    scheme, _, raw_key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise Unauthorized(
            "missing_api_key",
            "send your API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return raw_key.strip()


def unknown_key() -> Unauthorized:
    """The refusal of a key that is unknown or revoked."""
    return Unauthorized(
        "invalid_api_key",
        "the API key is unknown, revoked or expired",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def authenticate(session: AsyncSession, authorization: str | None) -> Principal:
    """The principal behind an `Authorization: Bearer <key>` header, or `Unauthorized`.

    Uncached, for the command line; the API looks keys up through `app.access.lookups`.
    """
    key_hash = hash_key(api_key_from_header(authorization))
    row = (
        await session.execute(
            select(
                Client.id,
                Client.name,
                Client.default_sender_id,
                ApiKey.is_admin,
                ApiKey.id,
                ApiKey.expires_at,
                Client.pumping,
                Client.quiet_hours_start,
                Client.quiet_hours_end,
            )
            .join(ApiKey, ApiKey.client_id == Client.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
    ).one_or_none()
    if row is None:
        raise unknown_key()
    client_id, name, default_sender_id, is_admin, key_id, expires_at, pumping, start, end = row
    principal = Principal(
        client_id,
        name,
        default_sender_id,
        is_admin,
        key_id,
        expires_at,
        pumping,
        quiet_hours=quiet_hours_of(start, end),
    )
    if principal.expired():
        raise unknown_key()
    return principal
