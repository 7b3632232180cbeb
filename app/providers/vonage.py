"""Vonage SMS API adapter (`POST {base_url}/sms/json`) with signed delivery receipts and inbound.

Sources (Vonage developer docs and the API specification `definitions/sms.yml`):
- send: form-encoded parameters; the JSON response holds one entry per part of a long message,
  each with its own `status` (`"0"` = accepted) and `message-id`;
- delivery receipts (DLRs): `messageId`, `status`, `err-code`, `client-ref`, ... one per part;
- inbound messages ("Inbound SMS"): `msisdn` (the sender), `to` (our number), `messageId`, `type`
  (`text`, `unicode` or `binary`), `text` and `keyword` for text, `data` and `udh` for binary,
  `message-timestamp`, and `timestamp` and `nonce` when signed; a long message may arrive in parts,
  each with `concat` = `true`, `concat-ref` (shared by the parts), `concat-total` and `concat-part`
  (1-based); numbers carry no '+';
- signed webhooks ("Signing messages"): `sig` over the other parameters, sorted by key, with every
  `&` and `=` in values replaced by `_`, joined as `&k=v&k=v`; "md5hash" is MD5 of that string
  followed by the secret, the other methods are an HMAC of it keyed with the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Literal

import httpx
from pydantic import BaseModel, SecretStr

from app.kernel.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    Encoding,
    ErrorKind,
    InboundPart,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    Provider,
    ProviderError,
    StatusReport,
    post_form,
    retry_after_seconds,
)

CALLBACK_PATH: Final = "/v1/webhooks/vonage/status"

# The documented range of `ttl` (milliseconds): 20 s to 7 days; Vonage's default is 72 h. A value
# outside it is refused with status 3 (a permanent failure), so we clamp instead: a validity
# shorter than 20 s is not meaningfully different from 20 s, and anything past 7 days exceeds
# what operators honour anyway (the docs say 24-48 h is the typical effective maximum).
TTL_MIN_MS: Final = 20_000
TTL_MAX_MS: Final = 604_800_000

# Send response `status` -> what the worker may do. Only a non-zero status reaches this table, and
# a non-zero status means Vonage did not accept that part, so nothing is "unknown outcome" here.
# Send status "1", Throttled: faster than the account's messages-per-second limit.
THROTTLED_STATUS: Final = "1"
# Send status "5", Internal Error: Vonage's platform is failing (counts against its circuit).
INTERNAL_ERROR_STATUS: Final = "5"

# The code of a message Vonage accepted only some parts of (the detail says how many).
PARTIALLY_SENT: Final = "partially_sent"

SEND_STATUS_KINDS: Final[Mapping[str, ErrorKind]] = {
    "1": ErrorKind.RETRYABLE,  # Throttled: sending faster than the account limit
    "2": ErrorKind.PERMANENT,  # Missing Parameters
    "3": ErrorKind.PERMANENT,  # Invalid Parameters
    "4": ErrorKind.PERMANENT,  # Invalid Credentials: needs an operator, not a retry
    "5": ErrorKind.RETRYABLE,  # Internal Error: platform fault while processing, not accepted
    "6": ErrorKind.PERMANENT,  # Invalid Message, e.g. an unrecognised number prefix
    "7": ErrorKind.PERMANENT,  # Number Barred
    "8": ErrorKind.PERMANENT,  # Partner Account Barred: account suspended
    # Partner Quota Violation: "top-up and retry" needs a human; our backoff would only repeat it.
    "9": ErrorKind.PERMANENT,
    "10": ErrorKind.RETRYABLE,  # Too Many Existing Binds: documented resolution is back-off/retry
    "11": ErrorKind.PERMANENT,  # Account Not Enabled For HTTP
    "12": ErrorKind.PERMANENT,  # Message Too Long
    "14": ErrorKind.PERMANENT,  # Invalid Signature
    "15": ErrorKind.PERMANENT,  # Invalid Sender Address
    "22": ErrorKind.PERMANENT,  # Invalid Network Code
    "23": ErrorKind.PERMANENT,  # Invalid Callback Url
    "29": ErrorKind.PERMANENT,  # Non-Whitelisted Destination (demo account)
    "32": ErrorKind.PERMANENT,  # Signature And API Secret Disallowed
    "33": ErrorKind.PERMANENT,  # Number De-activated
}

# Meanings from the documented table, used when a response carries no `error-text`.
SEND_STATUS_TEXT: Final[Mapping[str, str]] = {
    "1": "Throttled",
    "2": "Missing Parameters",
    "3": "Invalid Parameters",
    "4": "Invalid Credentials",
    "5": "Internal Error",
    "6": "Invalid Message",
    "7": "Number Barred",
    "8": "Partner Account Barred",
    "9": "Partner Quota Violation",
    "10": "Too Many Existing Binds",
    "11": "Account Not Enabled For HTTP",
    "12": "Message Too Long",
    "14": "Invalid Signature",
    "15": "Invalid Sender Address",
    "22": "Invalid Network Code",
    "23": "Invalid Callback Url",
    "29": "Non-Whitelisted Destination",
    "32": "Signature And API Secret Disallowed",
    "33": "Number De-activated",
}

# DLR `status` -> ours. `accepted` and `buffered` mean the carrier has it but has not delivered
# yet, which is our SENT; `unknown` ("no useful information available") moves nothing.
DLR_STATUSES: Final[Mapping[str, MessageStatus | None]] = {
    "delivered": MessageStatus.DELIVERED,
    "expired": MessageStatus.EXPIRED,
    "failed": MessageStatus.FAILED,
    "rejected": MessageStatus.REJECTED,
    "accepted": MessageStatus.SENT,
    "buffered": MessageStatus.SENT,
    "unknown": None,
}

# DLR `err-code` meanings, as documented ("0" is success and is not reported as an error).
DLR_ERROR_CODES: Final[Mapping[str, str]] = {
    "1": "Unknown: not delivered, and no reason could be determined",
    "2": "Absent Subscriber - Temporary: handset temporarily unavailable",
    "3": "Absent Subscriber - Permanent: the number is no longer active",
    "4": "Call Barred by User",
    "5": "Portability Error",
    "6": "Anti-Spam Rejection: blocked by a carrier's anti-spam filter",
    "7": "Handset Busy",
    "8": "Network Error",
    "9": "Illegal Number: the user asked not to receive messages from this service",
    "10": "Illegal Message: an error in a message parameter, e.g. wrong encoding flag",
    "11": "Unroutable: Vonage cannot find a suitable route",
    "12": "Destination Unreachable",
    "13": "Subscriber Age Restriction",
    "14": "Number Blocked by Carrier",
    "15": "Prepaid Insufficient Funds",
    "99": "General Error: typically an error in the route",
}

# DLR `err-code`s that mean the recipient opted out, so we record the opt-out as well as failing
# the message. These are DLR codes only: send status "9" is a quota violation, not an opt-out.
OPT_OUT_ERROR_CODES: Final = frozenset(
    {
        "9",  # "Illegal Number": the user asked not to receive messages from this service
    }
)

# Our numbers longer than this are long (E.164) numbers, given without '+'; up to this many
# digits, `to` is a short code, which has no country prefix and must stay as it is.
SHORT_CODE_MAX_DIGITS: Final = 8

# ASCII digits only: `str.isdigit` also accepts characters such as '²' that `int` refuses.
_DIGITS: Final = re.compile(r"[0-9]+")
# A part count: also short enough that `int` never hits its digit limit.
_SMALL_INT: Final = re.compile(r"[0-9]{1,9}")


def signature_base_string(params: Mapping[str, str]) -> str:
    """The documented string Vonage signs: `&key=value` pairs sorted by key, `sig` left out."""
    return "".join(
        f"&{key}={params[key].replace('&', '_').replace('=', '_')}"
        for key in sorted(params)
        if key != "sig"
    )


def compute_signature(params: Mapping[str, str], secret: str, method: str) -> str:
    """The lower-case hex signature of `params` with `secret` under a Vonage signature method."""
    # "surrogatepass": a lone surrogate (valid in a JSON body, never in what Vonage signs) must
    # make the signature not match, not the check crash.
    base = signature_base_string(params).encode("utf-8", "surrogatepass")
    if method == "md5hash":
        return hashlib.md5(base + secret.encode()).hexdigest()
    # The HMAC methods are named as hashlib names them: md5, sha1, sha256, sha512.
    return hmac.new(secret.encode(), base, method).hexdigest()


class VonageSettings(BaseModel):
    """Vonage SMS API (`/sms/json`) with signed callbacks: `VONAGE__*`."""

    api_key: str = ""
    api_secret: SecretStr = SecretStr("")
    signature_secret: SecretStr = SecretStr("")
    signature_method: Literal["md5hash", "md5", "sha1", "sha256", "sha512"] = "md5hash"
    base_url: str = "https://rest.nexmo.com"
    # Signed callbacks older than this are refused (replay protection).
    signature_max_age_seconds: int = 300


class VonageProvider(Provider):
    """Sends through the Vonage SMS API and reads its signed delivery receipts and inbound SMS."""

    name: ClassVar[str] = "vonage"

    def __init__(
        self,
        settings: VonageSettings,
        http: httpx.AsyncClient,
        public_base_url: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._http = http
        self._callback_url = public_base_url.rstrip("/") + CALLBACK_PATH
        self._clock = clock

    async def send(self, sms: OutboundSms) -> Accepted:
        """Submit one message; raise `ProviderError` when Vonage did not accept every part."""
        url = self._settings.base_url.rstrip("/") + "/sms/json"
        response = await post_form(self._http, "Vonage", url, self._form(sms))
        return _accepted_or_raise(response)

    def _form(self, sms: OutboundSms) -> dict[str, str]:
        form = {
            "api_key": self._settings.api_key,
            "api_secret": self._settings.api_secret.get_secret_value(),
            "from": _vonage_address(sms.sender),
            "to": sms.to.removeprefix("+"),
            "text": sms.body,
            "type": "unicode" if sms.encoding is Encoding.UCS2 else "text",
            # The spec types it boolean (and a form boolean is `true`); "1" fails validation.
            "status-report-req": "true",
            "callback": self._callback_url,
            # Every part's DLR echoes client-ref, which is how a callback finds its message.
            "client-ref": str(sms.message_id),
        }
        if sms.validity_seconds is not None:
            ttl_ms = min(max(sms.validity_seconds * 1000, TTL_MIN_MS), TTL_MAX_MS)
            form["ttl"] = str(ttl_ms)
        return form

    def verify_callback(self, request: CallbackRequest) -> bool:
        """True only for a fresh callback whose `sig` matches our signature secret."""
        secret = self._settings.signature_secret.get_secret_value()
        sig = request.params.get("sig", "")
        if not secret or not sig:
            return False
        try:
            signed_at = int(request.params["timestamp"])
        except (KeyError, ValueError):
            return False
        # Replay protection; a timestamp too far in the future is as suspect as a stale one.
        if abs(self._clock() - signed_at) > self._settings.signature_max_age_seconds:
            return False
        expected = compute_signature(request.params, secret, self._settings.signature_method)
        # md5hash signatures arrive in lower-case hex, HMAC ones in upper case: compare folded.
        return hmac.compare_digest(expected.encode(), sig.lower().encode("utf-8", "surrogatepass"))

    def parse_status_callback(self, request: CallbackRequest) -> StatusReport:
        """Map a delivery receipt to a report; raise `InvalidCallback` without id or status."""
        params = request.params
        provider_message_id = params.get("messageId", "")
        provider_status = params.get("status", "")
        if not provider_message_id or not provider_status:
            raise InvalidCallback("Vonage delivery receipt without messageId or status")
        err_code = params.get("err-code") or None
        if err_code == "0":
            err_code = None
        return StatusReport(
            # One DLR per part, each with that part's messageId: match on message_id first.
            provider_message_id=provider_message_id,
            provider_status=provider_status,
            # An undocumented status is recorded rather than refused: refusing makes Vonage retry.
            status=DLR_STATUSES.get(provider_status.lower()),
            message_id=_uuid_or_none(params.get("client-ref")),
            error_code=err_code,
            error_message=DLR_ERROR_CODES.get(err_code) if err_code else None,
            raw=dict(params),
            recipient_opted_out=err_code in OPT_OUT_ERROR_CODES,
            per_part=True,
        )

    def parse_inbound(self, request: CallbackRequest) -> InboundSms:
        """Read an inbound-SMS webhook; raise `InvalidCallback` if required fields are missing."""
        params = request.params
        provider_message_id = params.get("messageId", "")
        msisdn = params.get("msisdn", "")
        to = params.get("to", "")
        if not provider_message_id or not msisdn or not to:
            raise InvalidCallback("Vonage inbound message without messageId, msisdn or to")
        part = _inbound_part(params)
        return InboundSms(
            provider_message_id=provider_message_id,
            # A sender that is not all digits is an alphanumeric ID: kept as given.
            from_="+" + msisdn if _DIGITS.fullmatch(msisdn) else msisdn,
            to="+" + to if _DIGITS.fullmatch(to) and len(to) > SHORT_CODE_MAX_DIGITS else to,
            # A binary message has `data` and `udh` instead of text; they stay in `raw`.
            body="" if params.get("type") == "binary" else params.get("text", ""),
            num_segments=part.total if part is not None else 1,
            part=part,
            raw=dict(params),
        )


def _vonage_address(sender: str) -> str:
    """Vonage wants numbers without '+'; alphanumeric sender IDs pass through unchanged."""
    digits = sender.removeprefix("+")
    return digits if digits.isdigit() else sender


def _inbound_part(params: Mapping[str, str]) -> InboundPart | None:
    """Where this inbound message belongs in a long one, or None when it is whole.

    Carriers that do not support concatenation send no `concat`, and their parts arrive as
    separate whole messages: nothing here can tell them apart.
    """
    if params.get("concat", "").lower() != "true":
        return None
    reference = params.get("concat-ref", "")
    total = params.get("concat-total", "")
    number = params.get("concat-part", "")
    if not reference or not _SMALL_INT.fullmatch(total) or not _SMALL_INT.fullmatch(number):
        raise InvalidCallback(
            "Vonage concatenated message without a concat-ref, or with a non-numeric "
            f"concat-total ({total[:20]!r}) or concat-part ({number[:20]!r})"
        )
    part = InboundPart(reference=reference, total=int(total), number=int(number))
    if not 1 <= part.number <= part.total:
        raise InvalidCallback(f"Vonage concat-part {part.number} is not in 1..{part.total}")
    return part


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    """Our message id from `client-ref`, or None when it is absent or not a UUID."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _accepted_or_raise(response: httpx.Response) -> Accepted:
    """Classify a send response: `Accepted` only when every part has status "0"."""
    _raise_for_http_status(response)
    parts = _parts(response)
    if parts is None:
        # A 200 means Vonage handled the request; without a readable body we cannot tell
        # whether it accepted the message, so it must not be resent blindly.
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME,
            f"unreadable Vonage response: {response.text[:200]!r}",
        )
    failed = [part for part in parts if str(part.get("status")) != "0"]
    if not failed:
        return _accepted_parts(parts)
    raise _refusal(parts, failed)


def _raise_for_http_status(response: httpx.Response) -> None:
    """Raise for any answer but HTTP 200: a 504 may hide an acceptance, a 429 or other 5xx is
    retried, anything else is a refusal of the request itself."""
    status_code = response.status_code
    if status_code == 504:
        # A gateway timeout may come after Vonage took the message: never resend blindly.
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME,
            "Vonage answered HTTP 504",
            code="http_504",
            provider_fault=True,
        )
    if status_code == 429 or status_code >= 500:
        raise ProviderError(
            ErrorKind.RETRYABLE,
            f"Vonage answered HTTP {status_code}",
            code=f"http_{status_code}",
            retry_after=retry_after_seconds(response.headers),
            throttled=status_code == 429,
            provider_fault=status_code >= 500,
        )
    if status_code != 200:
        raise ProviderError(
            ErrorKind.PERMANENT,
            f"Vonage refused the request: HTTP {status_code} {response.text[:200]}",
            code=f"http_{status_code}",
        )


def _accepted_parts(parts: list[Mapping[str, Any]]) -> Accepted:
    """Every part accepted: the first part's id, with every part's id for a long message."""
    part_ids = [part.get("message-id") for part in parts]
    if not all(isinstance(part_id, str) and part_id for part_id in part_ids):
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME, "Vonage accepted the message without a message-id"
        )
    # Each part has its own id and its own receipt (each echoing our client-ref); the
    # message settles from all of them (app.delivery.parts).
    ids = tuple(str(part_id) for part_id in part_ids)
    return Accepted(provider_message_id=ids[0], part_ids=ids if len(ids) > 1 else ())


def _refusal(parts: list[Mapping[str, Any]], failed: list[Mapping[str, Any]]) -> ProviderError:
    """The error for a response with refused parts, named by the first refused part."""
    first = next(n for n, part in enumerate(parts, 1) if str(part.get("status")) != "0")
    status = str(failed[0].get("status"))
    text = failed[0].get("error-text") or SEND_STATUS_TEXT.get(status, "undocumented status")
    if len(failed) < len(parts):
        # Some parts are already on their way: resending would duplicate them on the handset,
        # so the message fails, with a code that says part of it may have reached the phone.
        return ProviderError(
            ErrorKind.PERMANENT,
            f"partially sent: {len(parts) - len(failed)} of {len(parts)} parts accepted; "
            f"part {first} refused with status {status}: {text}",
            code=PARTIALLY_SENT,
        )
    # An undocumented non-zero status still means "not accepted"; failing is the safe default.
    kind = SEND_STATUS_KINDS.get(status, ErrorKind.PERMANENT)
    return ProviderError(
        kind,
        f"status {status}: {text}",
        code=status,
        throttled=status == THROTTLED_STATUS,
        provider_fault=status == INTERNAL_ERROR_STATUS,
    )


def _parts(response: httpx.Response) -> list[Mapping[str, Any]] | None:
    """The `messages` entries of a send response, or None when the body is not that shape."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(part, dict) and "status" in part for part in messages):
        return None
    return messages
