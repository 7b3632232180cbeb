"""Setting a client's quiet hours (admin): stored on the client, read with its API key."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client
from app.kernel.errors import NotFound
from app.kernel.quiet_hours import QuietHours, quiet_hours_of


async def get_quiet_hours(session: AsyncSession, client: str) -> QuietHours | None:
    """A client's quiet hours (None: not set); `NotFound` for an unknown client."""
    row = (
        await session.execute(
            select(Client.quiet_hours_start, Client.quiet_hours_end).where(Client.name == client)
        )
    ).one_or_none()
    if row is None:
        raise _unknown(client)
    return quiet_hours_of(*row)


async def set_quiet_hours(session: AsyncSession, client: str, window: QuietHours | None) -> None:
    """Set (or, with None, clear) a client's quiet hours."""
    done = await session.scalar(
        update(Client)
        .where(Client.name == client)
        .values(
            quiet_hours_start=window.start if window else None,
            quiet_hours_end=window.end if window else None,
        )
        .returning(Client.id)
    )
    if done is None:
        raise _unknown(client)


def _unknown(client: str) -> NotFound:
    return NotFound("client_not_found", f"no client named {client!r}")
