"""A client's own pumping alarm settings, set by an admin (stored on the client, read with its
key by the cached lookups: a change reaches every API process within LOOKUP_CACHE_SECONDS)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client
from app.kernel.errors import NotFound


async def _client(session: AsyncSession, client_name: str) -> Client:
    client = await session.scalar(select(Client).where(Client.name == client_name))
    if client is None:
        raise NotFound("client_not_found", f"no client named {client_name!r}")
    return client


async def client_pumping(
    session: AsyncSession, client_name: str
) -> tuple[uuid.UUID, dict[str, Any] | None]:
    """The client's id and own settings (None: the service's); `NotFound` for an unknown
    client."""
    client = await _client(session, client_name)
    return client.id, client.pumping


async def set_client_pumping(
    session: AsyncSession, client_name: str, own: dict[str, Any]
) -> tuple[uuid.UUID, dict[str, Any] | None]:
    """Replace the client's own settings (null fields dropped; none left: the service's)."""
    client = await _client(session, client_name)
    kept = {name: value for name, value in own.items() if value is not None}
    client.pumping = kept or None
    await session.flush()
    return client.id, client.pumping
