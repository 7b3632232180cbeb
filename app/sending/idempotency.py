"""Idempotency-Key handling, after the IETF draft and Stripe.

The first request with a key takes a transaction-scoped advisory lock on (client, key), does its
work and stores its response in the same transaction (`app.sending.accept`), so the stored response
exists exactly when the work was committed. A retry with the same body gets that response back and
does nothing; with a different body it gets 422; while the first is still running it gets 409. Only
successful responses are stored: a refused request did nothing, so repeating it is safe and
re-evaluated.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.kernel.errors import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response to send, and whether it is a replay of an earlier one."""

    status: int
    body: dict[str, Any]
    replayed: bool
    # Headers to send with it, not stored (a replay has none): the quota's RateLimit fields.
    headers: dict[str, str] = field(default_factory=dict)


def fingerprint(payload: Any) -> bytes:
    """A stable hash of a request body: one JSON value gives one hash, in any key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # "surrogatepass": a lone surrogate in the body (valid JSON, invalid UTF-8) still hashes.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


def lock_id(client_id: uuid.UUID, key: str) -> int:
    """The advisory lock a request holds on its (client, key) while it runs."""
    digest = hashlib.sha256(f"idempotency:{client_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def check_key(key: str) -> None:
    """Refuse a key we cannot store (422 naming the header)."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed.for_field(
            "invalid_idempotency_key", HEADER, f"must be 1 to {MAX_KEY_LENGTH} printable characters"
        )


def key_in_use() -> Conflict:
    """The answer while the key's first request is still running."""
    return Conflict(
        "idempotency_key_in_use",
        "a request with this Idempotency-Key is still being processed; retry shortly",
        headers={"Retry-After": "1"},
    )


def key_reused() -> ValidationFailed:
    """The answer to a key used again with another body."""
    return ValidationFailed.for_field(
        "idempotency_key_reused",
        HEADER,
        "this key was used with a different request body; use a new key",
    )
