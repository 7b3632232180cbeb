"""API keys: random secrets shown once, stored as SHA-256, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import ApiKey, Client
from app.errors import Unauthorized

KEY_PREFIX = "sk_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a client, and whether the key may manage the service."""

    client_id: uuid.UUID
    client_name: str
    default_sender_id: uuid.UUID | None
    is_admin: bool


def hash_key(raw_key: str) -> bytes:
    """The stored form of a key. Keys carry 256 random bits, so a fast hash is safe."""
    return hashlib.sha256(raw_key.encode()).digest()


async def create_api_key(session: AsyncSession, client_name: str, *, is_admin: bool = False) -> str:
    """Create (or reuse) the client `client_name` and a new key for it; return the raw key."""
    client = await session.scalar(select(Client).where(Client.name == client_name))
    if client is None:
        client = Client(id=uuid.uuid4(), name=client_name)
        session.add(client)
        await session.flush()
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            client_id=client.id, key_hash=hash_key(raw_key), prefix=raw_key[:10], is_admin=is_admin
        )
    )
    await session.flush()
    return raw_key


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
        "the API key is unknown or revoked",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def authenticate(session: AsyncSession, authorization: str | None) -> Principal:
    """The principal behind an `Authorization: Bearer <key>` header, or `Unauthorized`.

    Uncached, for the command line; the API looks keys up through `app.domain.lookups`.
    """
    key_hash = hash_key(api_key_from_header(authorization))
    row = (
        await session.execute(
            select(Client.id, Client.name, Client.default_sender_id, ApiKey.is_admin)
            .join(ApiKey, ApiKey.client_id == Client.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
    ).one_or_none()
    if row is None:
        raise unknown_key()
    return Principal(
        client_id=row[0], client_name=row[1], default_sender_id=row[2], is_admin=row[3]
    )
