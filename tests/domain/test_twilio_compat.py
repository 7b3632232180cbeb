"""Twilio's vocabulary for our messages: statuses, error codes, SIDs, dates, signatures."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from app.db.models import Message
from app.kernel.errors import PolicyRefusal, ValidationFailed
from app.kernel.status import MessageStatus
from app.twilio_api import vocabulary as twilio


def _message(**changes: Any) -> Message:
    values: dict[str, Any] = {
        "id": uuid.UUID("5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"),
        "client_id": uuid.UUID("0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"),
        "to": "+14155550123",
        "from_": "+14155550100",
        "body": "hi",
        "segments": 2,
        "status": "queued",
        "provider": "twilio",
        "error_code": None,
        "error_message": None,
        "created_at": datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC),
        "updated_at": datetime(2026, 11, 26, 10, 0, 3, tzinfo=UTC),
        "claimed_at": datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC),
    }
    values.update(changes)
    return Message(**values)


def test_every_status_has_a_twilio_status() -> None:
    assert set(twilio.STATUSES) == set(MessageStatus)
    assert twilio.STATUSES[MessageStatus.EXPIRED] == "failed"
    assert twilio.STATUSES[MessageStatus.REJECTED] == "failed"


def test_resource_fields() -> None:
    sid = twilio.account_sid(uuid.UUID("0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"))

    queued = twilio.resource(_message(), sid)

    assert sid == "AC0f8e5c1e2b7a4d579a0c7c1d2e3f4a5b"
    assert queued["sid"] == "SM5b0e8f0a3c2d4c559a510c6d2f1c9f10"
    assert queued["date_created"] == "Thu, 26 Nov 2026 10:00:00 +0000"
    assert queued["date_sent"] is None  # not handed to a provider yet
    assert queued["num_segments"] == "2" and queued["error_code"] is None
    delivered = twilio.resource(_message(status="delivered"), sid)
    assert delivered["date_sent"] == "Thu, 26 Nov 2026 10:00:01 +0000"


@pytest.mark.parametrize(
    ("status", "provider", "error_code", "expected"),
    [
        ("failed", "twilio", "30003", 30003),  # Twilio's own code passes through
        ("undelivered", "vonage", "6", 30008),  # another provider's: unknown error
        ("canceled", "twilio", "recipient_opted_out", 21610),
        ("expired", "twilio", "expired", 30036),
        ("canceled", "twilio", "canceled", None),  # canceled by its client
        ("delivered", "twilio", "30003", None),  # a retry succeeded: no error
    ],
)
def test_message_error_codes(
    status: str, provider: str, error_code: str, expected: int | None
) -> None:
    message = _message(status=status, provider=provider, error_code=error_code, error_message="x")

    assert twilio.resource(message, "AC" + "0" * 32)["error_code"] == expected
    params = twilio.callback_params(message)
    assert params.get("ErrorCode") == (str(expected) if expected else None)


def test_sids_parse_back_and_strangers_do_not() -> None:
    message_id = uuid.uuid4()

    assert twilio.parse_sid(twilio.message_sid(message_id), "SM") == message_id
    assert twilio.parse_sid(twilio.message_sid(message_id), "AC") is None
    assert twilio.parse_sid("SM" + "g" * 32, "SM") is None
    assert twilio.parse_sid("SM" + "0" * 31, "SM") is None


def test_refusals_become_twilios_codes() -> None:
    opted_out = twilio.from_service_error(PolicyRefusal("recipient_opted_out", "opted out"))
    invalid_to = twilio.from_service_error(
        ValidationFailed.for_field("validation_error", "to", "not a phone number")
    )
    validity = twilio.from_service_error(
        ValidationFailed.for_field("validation_error", "validity_period", "too big")
    )
    other = twilio.from_service_error(
        ValidationFailed.for_field("validation_error", "metadata", "not here")
    )

    assert (opted_out.code, opted_out.status) == (21610, 400)
    assert (invalid_to.code, invalid_to.message) == (21211, "To: not a phone number")
    assert (validity.code, validity.message) == (90007, "ValidityPeriod: too big")
    assert (other.code, other.message) == (60200, "metadata: not here")
    assert other.body()["more_info"] == "https://www.twilio.com/docs/errors/60200"


def test_signature_is_what_twilios_validator_expects() -> None:
    url = "https://example.com/status?order=1042"
    params = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered", "To": "+14155550123"}

    signed = twilio.signature("12345678901234567890123456789012", url, params)

    assert RequestValidator("12345678901234567890123456789012").validate(url, params, signed)
    assert not RequestValidator("x" * 32).validate(url, params, signed)
    assert not RequestValidator("12345678901234567890123456789012").validate(
        url, {**params, "MessageStatus": "failed"}, signed
    )
