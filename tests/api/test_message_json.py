"""`message_out_json`: what accepted sends and batches answer is exactly what `MessageOut` would
write, for every field and every shape of value a message can have."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from app.api import schemas
from app.api.schemas import MessageOut, message_out_json
from app.domain.status import MessageStatus


def values(**changes: Any) -> dict[str, Any]:
    """A message's attributes as the accept path has them (`accept.message_fields`)."""
    now = datetime(2026, 12, 4, 18, 0, 0, 123456, tzinfo=UTC)
    return {
        "id": uuid.uuid4(),
        "status": "queued",
        "to": "+14155550123",
        "from_": "ACME",
        "body": "Votre commande est expédiée ✓",
        "encoding": "UCS-2",
        "segments": 1,
        "provider": "vonage",
        "provider_message_id": None,
        "error_code": None,
        "error_message": None,
        "callback_url": None,
        "validity_period": None,
        "expires_at": None,
        "metadata_": {},
        "created_at": now,
        "updated_at": now,
    } | changes


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"status": MessageStatus.FAILED, "error_code": "21610", "error_message": "unsubscribed"},
        {"provider_message_id": "SM" + "0" * 32, "status": "sent"},
        {"callback_url": "https://hooks.example.com/sms?x=1", "validity_period": 600},
        {"expires_at": datetime(2026, 12, 4, 18, 10, tzinfo=UTC)},  # no microseconds
        {"created_at": datetime(2026, 12, 4, 19, 0, tzinfo=timezone(timedelta(hours=1)))},
        {"metadata_": {"order_id": "1042", "note": "é\u2028", "nested": {"a": [1, None]}}},
    ],
)
def test_it_writes_what_message_out_writes(changes: dict[str, Any]) -> None:
    message = values(**changes)
    expected = MessageOut.model_validate(message).model_dump(mode="json", by_alias=True)
    assert message_out_json(message) == expected


def test_a_field_type_it_cannot_write_is_refused_when_the_module_loads() -> None:
    """A field added to `MessageOut` with a type it does not know fails at import, not later."""
    with pytest.raises(TypeError):
        schemas._json_converter(set[str])
