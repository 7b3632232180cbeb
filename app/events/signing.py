"""Signing events per the Standard Webhooks specification (https://www.standardwebhooks.com/).

Every attempt carries three headers:

* `webhook-id`: the event id (the same on every retry: receivers dedupe on it);
* `webhook-timestamp`: the attempt's time, integer Unix seconds (receivers refuse one more than
  five minutes from their clock, which stops replays);
* `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries, one per valid secret,
  over `{webhook-id}.{webhook-timestamp}.{body}` with the exact bytes of the body.

Secrets are `whsec_` + base64 of 32 random bytes (the spec asks for 24 to 64); the HMAC key is
the decoded bytes. Each client (and each sender with an endpoint) has its own. A rotation makes a
new secret and leaves the previous ones valid for a grace period, during which every attempt is
signed with all of them, so receivers can switch without missing an event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import SigningSecret
from app.events.endpoints import Owner, lock_owner

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def generate_secret() -> str:
    """A new secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature_header(keys: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,` signature per secret, newest first."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1,"
        + base64.b64encode(hmac.new(secret_key(key), signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def webhook_headers(
    keys: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(keys, msg_id, timestamp, body),
    }


def _valid_at(moment: datetime) -> ColumnElement[bool]:
    return or_(SigningSecret.expires_at.is_(None), SigningSecret.expires_at > moment)


async def active_secrets(session: AsyncSession, owner: Owner) -> list[SigningSecret]:
    """The owner's valid secrets, newest first; the first one is made on first use."""
    rows = await _select_active(session, owner)
    if rows:
        return rows
    await lock_owner(session, owner, "secrets")
    rows = await _select_active(session, owner)  # made meanwhile by another transaction?
    if not rows:
        session.add(
            SigningSecret(
                client_id=owner.client_id, sender_id=owner.sender_id, secret=generate_secret()
            )
        )
        await session.flush()
        rows = await _select_active(session, owner)
    return rows


async def _select_active(session: AsyncSession, owner: Owner) -> list[SigningSecret]:
    return list(
        await session.scalars(
            select(SigningSecret)
            .where(owner.matches(SigningSecret), _valid_at(datetime.now(UTC)))
            .order_by(SigningSecret.created_at.desc(), SigningSecret.id.desc())
            .execution_options(populate_existing=True)
        )
    )


async def rotate(session: AsyncSession, owner: Owner, grace: timedelta) -> list[SigningSecret]:
    """Make a new current secret; the ones valid now stay valid for `grace` (0: revoke them at
    once, after a leak). Returns the valid secrets, the new one first."""
    await lock_owner(session, owner, "secrets")
    now = datetime.now(UTC)
    expires = now + grace
    # A secret already retired keeps the earlier of its expiry and the new one.
    await session.execute(
        update(SigningSecret)
        .where(owner.matches(SigningSecret), _valid_at(now))
        .values(expires_at=func.least(func.coalesce(SigningSecret.expires_at, expires), expires))
    )
    session.add(
        SigningSecret(
            client_id=owner.client_id, sender_id=owner.sender_id, secret=generate_secret()
        )
    )
    await session.flush()
    return await _select_active(session, owner)
