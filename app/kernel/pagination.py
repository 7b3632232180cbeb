"""Cursor pagination, newest first, on (created_at, id): stable while new rows arrive."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from app.kernel.errors import ValidationFailed

IdType = TypeVar("IdType")


def encode_cursor(created_at: datetime, row_id: object) -> str:
    """An opaque cursor pointing just past the row at (created_at, row_id)."""
    raw = f"{created_at.isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, parse_id: Callable[[str], IdType]) -> tuple[datetime, IdType]:
    """The position a cursor points at, or `ValidationFailed` naming `cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, row_id = raw.partition("|")
        position = datetime.fromisoformat(created_at)
        if position.tzinfo is None:
            raise ValueError("cursors carry a UTC offset")
        # Converting here turns an edited, out-of-range timestamp into a 422 instead of a
        # database error.
        return position.astimezone(UTC), parse_id(row_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise ValidationFailed.for_field(
            "invalid_cursor", "cursor", "not a cursor returned by this API"
        ) from None


def as_utc(value: datetime, field: str) -> datetime:
    """`value` in UTC, or `ValidationFailed` naming `field` when it cannot be represented."""
    # The driver converts to UTC too, but a value near datetime's limits (year 1 at +14:00)
    # overflows there as an unhandled database error; report it as the client's mistake.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed.for_field(
            "validation_error", field, "out of range once converted to UTC"
        ) from None
