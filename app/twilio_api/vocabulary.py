"""Twilio's vocabulary for our messages: account and message SIDs, statuses, error codes, dates,
the Message resource, status callbacks and their `X-Twilio-Signature`, and the credentials a
client uses with the Twilio-compatible API (`app.twilio_api.routes`).

Nothing here decides anything about sending: a Twilio request becomes the same `SendCommand`
the JSON API makes, accepted by `app.sending.accept`; this module only translates.

* An account SID is `AC` + the client's id in hex, a message SID `SM` + the message's id in hex:
  both are derived, nothing new is stored.
* The auth token is random, one per client, issued by an admin (`POST /v1/twilio-credentials`
  or `smsgate twilio-credentials`), stored encrypted
  with SECRETS_KEY (it signs callbacks, so it cannot be hashed). Issuing again replaces it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, TwilioCredential
from app.kernel.errors import NotFound, ServiceError
from app.kernel.status import MessageStatus

API_VERSION: Final = "2010-04-01"
ACCOUNT_PREFIX: Final = "AC"
MESSAGE_PREFIX: Final = "SM"
_SID = re.compile(r"^(AC|SM)([0-9a-fA-F]{32})$")
MORE_INFO: Final = "https://www.twilio.com/docs/errors/{code}"

# Our statuses in Twilio's vocabulary: the one table.
STATUSES: Final[dict[MessageStatus, str]] = {
    MessageStatus.HELD: "accepted",  # stopped by the pumping alarm, not yet queued
    MessageStatus.SCHEDULED: "scheduled",
    MessageStatus.QUEUED: "queued",
    MessageStatus.SENDING: "sending",
    MessageStatus.SENT: "sent",
    MessageStatus.DELIVERED: "delivered",
    MessageStatus.UNDELIVERED: "undelivered",
    MessageStatus.FAILED: "failed",
    MessageStatus.EXPIRED: "failed",  # Twilio fails a message whose ValidityPeriod ran out
    MessageStatus.CANCELED: "canceled",
    MessageStatus.REJECTED: "failed",
}

# A message's `error_code` (ours, or a provider's that is not Twilio's) as a Twilio error code.
MESSAGE_ERROR_CODES: Final[dict[str, int]] = {
    "recipient_opted_out": 21610,  # Attempt to send to unsubscribed recipient
    "expired": 30036,  # Validity Period Expired
}
UNKNOWN_MESSAGE_ERROR: Final = 30008  # Unknown error

# A refusal of ours (its `code`) as Twilio answers the same case: (Twilio code, HTTP status).
REFUSALS: Final[dict[str, tuple[int, int]]] = {
    "invalid_to": (21211, 400),  # Invalid 'To' Phone Number
    "missing_to": (21604, 400),  # 'To' phone number is required
    "missing_body": (21602, 400),  # Message body is required
    "too_many_segments": (21617, 400),  # The concatenated message body exceeds the limit
    "body_too_long": (21617, 400),
    "invalid_from": (21212, 400),  # Invalid 'From' Phone Number
    "unknown_sender": (21606, 400),  # The 'From' number is not a valid message-capable number
    "sender_keywords_incomplete": (21606, 400),
    "no_default_sender": (21603, 400),  # 'From' phone number is required
    # The 'To' phone number is not currently reachable using the 'From' phone number via SMS
    "no_sender_for_destination": (21612, 400),
    "recipient_opted_out": (21610, 400),  # Attempt to send to unsubscribed recipient
    "invalid_status_callback": (21609, 400),  # Invalid 'StatusCallback'
    "invalid_validity_period": (90007, 400),  # Invalid validity period value
    "cannot_cancel": (30409, 400),  # This message cannot be canceled
    "invalid_api_key": (20003, 401),  # Authenticate
    "message_not_found": (20404, 404),  # The requested resource was not found
    "not_found": (20404, 404),
    "idempotency_key_in_use": (20409, 409),  # a conflict (not a documented Twilio code)
    "service_unavailable": (20503, 503),  # Service unavailable
    # Permission to send an SMS has not been enabled for the region of the 'To' number
    "destination_not_permitted": (21408, 400),
    "number_type_not_permitted": (21408, 400),
    "rate_limited": (20429, 429),  # Too Many Requests
    "quota_exceeded": (20429, 429),
}
# Any other invalid parameter: Twilio's "Invalid parameter" (HTTP 400).
INVALID_PARAMETER: Final = (60200, 400)

# Pydantic's complaints about one of `SendMessageRequest`'s fields, as our refusal codes.
FIELD_CODES: Final[dict[str, str]] = {
    "to": "invalid_to",
    "from": "invalid_from",
    "callback_url": "invalid_status_callback",
    "validity_period": "invalid_validity_period",
}
# The form parameter each field comes from (for messages naming what the client sent).
PARAMETERS: Final[dict[str, str]] = {
    "to": "To",
    "from": "From",
    "body": "Body",
    "callback_url": "StatusCallback",
    "validity_period": "ValidityPeriod",
}


class TwilioError(Exception):
    """An answer in Twilio's error shape: `{code, message, more_info, status}`."""

    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        """The response body, as Twilio writes it."""
        return {
            "code": self.code,
            "message": self.message,
            "more_info": MORE_INFO.format(code=self.code),
            "status": self.status,
        }


def refusal(code: str, message: str) -> TwilioError:
    """The Twilio error for our refusal `code` (`REFUSALS`, else "Invalid parameter")."""
    twilio_code, status = REFUSALS.get(code, INVALID_PARAMETER)
    return TwilioError(twilio_code, message, status)


def from_service_error(error: ServiceError) -> TwilioError:
    """A refusal of the shared pipeline in Twilio's shape. A field error names Twilio's parameter
    (`from` is `From`), and the field decides the code when the refusal's own code does not."""
    code = error.code
    if code not in REFUSALS and error.errors:
        code = FIELD_CODES.get(error.errors[0].field, code)
    if code not in REFUSALS and error.status in (401, 404, 503):
        code = {401: "invalid_api_key", 404: "not_found", 503: "service_unavailable"}[error.status]
    message = error.detail
    for field, parameter in PARAMETERS.items():
        if message.startswith(f"{field}: "):
            message = f"{parameter}: {message.removeprefix(f'{field}: ')}"
    return refusal(code, message)


def authentication_failed() -> TwilioError:
    """Twilio's answer to unknown or missing credentials."""
    return TwilioError(20003, "Authenticate", 401)


def account_sid(client_id: uuid.UUID) -> str:
    """A client's account SID."""
    return ACCOUNT_PREFIX + client_id.hex


def message_sid(message_id: uuid.UUID) -> str:
    """A message's SID."""
    return MESSAGE_PREFIX + message_id.hex


def parse_sid(sid: str, prefix: str) -> uuid.UUID | None:
    """The id inside an `AC…` or `SM…` SID, or None if it is not one of ours."""
    match = _SID.match(sid)
    if match is None or match.group(1) != prefix:
        return None
    return uuid.UUID(hex=match.group(2))


def rfc2822(moment: datetime | None) -> str | None:
    """A timestamp as Twilio writes it (`Fri, 24 May 2019 17:44:46 +0000`)."""
    return None if moment is None else format_datetime(moment).replace("-0000", "+0000")


def message_error_code(status: str, error_code: str | None, provider: str) -> int | None:
    """A message's error as a Twilio error code (Twilio's own codes pass through)."""
    if error_code is None or status not in ("failed", "undelivered", "expired", "canceled"):
        return None
    if provider == "twilio" and error_code.isdigit():
        return int(error_code)
    if status == "canceled" and error_code == "canceled":
        return None  # canceled by its client: no error
    return MESSAGE_ERROR_CODES.get(error_code, UNKNOWN_MESSAGE_ERROR)


def _error_code(message: Any, status: str) -> int | None:
    return message_error_code(status, _field(message, "error_code"), _field(message, "provider"))


def _field(message: Any, name: str) -> Any:
    return message[name] if isinstance(message, Mapping) else getattr(message, name)


def message_uri(sid: str, message_id: uuid.UUID) -> str:
    """A message's URI, relative to the service's base URL."""
    return f"/{API_VERSION}/Accounts/{sid}/Messages/{message_sid(message_id)}.json"


def resource(message: Any, sid: str) -> dict[str, Any]:
    """The Message resource for one of our messages (a `Message`, or the fields of one just
    accepted), as Twilio's API answers it."""
    message_id: uuid.UUID = _field(message, "id")
    status = str(_field(message, "status"))
    claimed_at = _field(message, "claimed_at")
    error_code = message_error_code(
        status, _field(message, "error_code"), _field(message, "provider")
    )
    return {
        "account_sid": sid,
        "api_version": API_VERSION,
        "body": _field(message, "body"),
        "date_created": rfc2822(_field(message, "created_at")),
        # When it was handed to the provider (its last attempt); null until it was.
        "date_sent": rfc2822(claimed_at) if status in _LEFT_US else None,
        "date_updated": rfc2822(_field(message, "updated_at")),
        "direction": "outbound-api",
        "error_code": error_code,
        "error_message": _field(message, "error_message") if error_code is not None else None,
        "from": _field(message, "from_"),
        "messaging_service_sid": None,
        "num_media": "0",
        "num_segments": str(_field(message, "segments")),
        "price": None,
        "price_unit": None,
        "sid": message_sid(message_id),
        "status": STATUSES[MessageStatus(status)],
        "subresource_uris": {},
        "to": _field(message, "to"),
        "uri": message_uri(sid, message_id),
    }


_LEFT_US: Final = frozenset({"sent", "delivered", "undelivered", "failed"})


def callback_params(message: Any) -> dict[str, str]:
    """The form fields of a status callback for a message's current status, as Twilio sends
    them (`ErrorCode` only when the message failed)."""
    message_id: uuid.UUID = _field(message, "id")
    status = str(_field(message, "status"))
    twilio_status = STATUSES[MessageStatus(status)]
    params = {
        "AccountSid": account_sid(_field(message, "client_id")),
        "ApiVersion": API_VERSION,
        "From": _field(message, "from_"),
        "MessageSid": message_sid(message_id),
        "MessageStatus": twilio_status,
        "SmsSid": message_sid(message_id),
        "SmsStatus": twilio_status,
        "To": _field(message, "to"),
    }
    error_code = message_error_code(
        status, _field(message, "error_code"), _field(message, "provider")
    )
    if error_code is not None:
        params["ErrorCode"] = str(error_code)
    return params


def signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """`X-Twilio-Signature`: base64 of HMAC-SHA1, keyed by the auth token, over the URL followed
    by each parameter's name and value, in the names' order."""
    signed = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def generate_auth_token() -> str:
    """A new auth token: 32 hex digits like Twilio's, from 128 random bits."""
    return secrets.token_hex(16)


async def issue_credentials(session: AsyncSession, client_name: str) -> tuple[str, str]:
    """Issue (or replace) a client's Twilio credentials: (account SID, auth token). The token is
    shown once; the previous one stops working (within the API's lookup cache time)."""
    client_id = await session.scalar(select(Client.id).where(Client.name == client_name))
    if client_id is None:
        raise NotFound("client_not_found", f"no client named {client_name!r}")
    token = generate_auth_token()
    statement = insert(TwilioCredential).values(client_id=client_id, auth_token=token)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[TwilioCredential.client_id],
            set_={"auth_token": statement.excluded.auth_token, "created_at": func.now()},
        )
    )
    return account_sid(client_id), token
