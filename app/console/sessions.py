"""Operators' console sessions, kept in PostgreSQL (`console_sessions`).

Signing in exchanges an admin API key (checked by app.access.auth: unknown, revoked, expired
and client keys are refused) for a random session token, set as an HttpOnly cookie; the table
holds only the token's SHA-256. Every request looks the session up joined with its key, so a
session ends at its `expires_at`, at sign-out (the row is deleted), and at the next request
once its key is revoked, has expired or is no longer an admin key. Expired rows are deleted by
the retention job (app.db.retention).
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import authenticate, hash_key
from app.db.models import ApiKey, ConsoleSession
from app.kernel.errors import Unauthorized

COOKIE: str = "smsgate_console"
# The sign-in form's own CSRF token (a double-submit cookie: there is no session yet).
SIGN_IN_COOKIE: str = "smsgate_console_sign_in"

# `last_seen_at` is written at most this often per session.
_SEEN_EVERY = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Operator:
    """The signed-in operator: their admin key and their session."""

    key_id: uuid.UUID
    key_name: str
    csrf_token: str
    expires_at: datetime


class SignInRefused(Exception):
    """The key is unknown, revoked, expired, or not an admin key."""


def new_token() -> str:
    """A random token (256 bits), for a session or a form."""
    return secrets.token_urlsafe(32)


def tokens_match(expected: str, submitted: str | None) -> bool:
    """Whether a submitted CSRF token is the expected one (in constant time)."""
    return bool(expected) and hmac.compare_digest(expected.encode(), (submitted or "").encode())


def _key_name(key: ApiKey) -> str:
    return key.name or key.prefix


async def sign_in(session: AsyncSession, raw_key: str, hours: float) -> tuple[str, Operator]:
    """A new session for an admin key: its token (for the cookie) and the operator, or
    `SignInRefused`."""
    try:
        principal = await authenticate(session, f"Bearer {raw_key.strip()}")
    except Unauthorized:
        raise SignInRefused from None
    if not principal.is_admin or principal.key_id is None:
        raise SignInRefused
    key = await session.get(ApiKey, principal.key_id)
    assert key is not None  # just authenticated
    token, csrf_token = new_token(), new_token()
    expires_at = datetime.now(UTC) + timedelta(hours=hours)
    session.add(
        ConsoleSession(
            token_hash=hash_key(token),
            api_key_id=key.id,
            csrf_token=csrf_token,
            expires_at=expires_at,
        )
    )
    await session.flush()
    return token, Operator(key.id, _key_name(key), csrf_token, expires_at)


async def signed_in(session: AsyncSession, token: str | None) -> Operator | None:
    """The operator of the session whose cookie holds `token`, if it is still valid: not
    expired, its key an admin key neither revoked nor expired."""
    if not token:
        return None
    token_hash = hash_key(token)
    row = (
        await session.execute(
            select(ConsoleSession, ApiKey)
            .join(ApiKey, ApiKey.id == ConsoleSession.api_key_id)
            .where(
                ConsoleSession.token_hash == token_hash,
                ConsoleSession.expires_at > func.now(),
                ApiKey.is_admin,
                ApiKey.revoked_at.is_(None),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()),
            )
        )
    ).one_or_none()
    if row is None:
        return None
    console_session, key = row
    if console_session.last_seen_at < datetime.now(UTC) - _SEEN_EVERY:
        await session.execute(
            update(ConsoleSession)
            .where(ConsoleSession.token_hash == token_hash)
            .values(last_seen_at=func.now())
        )
    return Operator(key.id, _key_name(key), console_session.csrf_token, console_session.expires_at)


async def sign_out(session: AsyncSession, token: str | None) -> None:
    """End the session whose cookie holds `token` (its row is deleted)."""
    if token:
        await session.execute(
            delete(ConsoleSession).where(ConsoleSession.token_hash == hash_key(token))
        )
