"""Idempotency-Key handling, after the IETF draft and Stripe.

The first request with a key takes a transaction-scoped advisory lock on (client, key), does its
work and stores its response in the same transaction, so the stored response exists exactly when
the work was committed. A retry with the same body gets that response back and does nothing; with a
different body it gets 422; while the first is still running it gets 409. Only successful
responses are stored: a refused request did nothing, so repeating it is safe and re-evaluated.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import IdempotencyKey
from app.errors import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response to send, and whether it is a replay of an earlier one."""

    status: int
    body: dict[str, Any]
    replayed: bool


def fingerprint(payload: Any) -> bytes:
    """A stable hash of a request body: one JSON value gives one hash, in any key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def _lock_id(client_id: uuid.UUID, key: str) -> int:
    digest = hashlib.sha256(f"idempotency:{client_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def run_idempotently(
    session: AsyncSession,
    *,
    client_id: uuid.UUID,
    key: str,
    request_fingerprint: bytes,
    ttl: timedelta,
    produce: Callable[[], Awaitable[tuple[int, dict[str, Any]]]],
) -> StoredResponse:
    """Run `produce` once per (client, key) within `ttl`; replay its stored response after that."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed.for_field(
            "invalid_idempotency_key", HEADER, f"must be 1 to {MAX_KEY_LENGTH} printable characters"
        )
    locked = await session.scalar(select(func.pg_try_advisory_xact_lock(_lock_id(client_id, key))))
    if not locked:
        raise Conflict(
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still being processed; retry shortly",
            headers={"Retry-After": "1"},
        )
    stored = await session.get(IdempotencyKey, (client_id, key), populate_existing=True)
    if stored is not None and stored.created_at < datetime.now(UTC) - ttl:
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.client_id == client_id, IdempotencyKey.key == key
            )
        )
        stored = None
    if stored is not None:
        if stored.request_hash != request_fingerprint:
            raise ValidationFailed.for_field(
                "idempotency_key_reused",
                HEADER,
                "this key was used with a different request body; use a new key",
            )
        return StoredResponse(stored.response_status, stored.response_body, replayed=True)
    status, body = await produce()
    session.add(
        IdempotencyKey(
            client_id=client_id,
            key=key,
            request_hash=request_fingerprint,
            response_status=status,
            response_body=body,
        )
    )
    await session.flush()
    return StoredResponse(status, body, replayed=False)


async def delete_expired_keys(session: AsyncSession, ttl: timedelta) -> int:
    """Forget keys older than `ttl`; returns how many."""
    result = await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - ttl)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
