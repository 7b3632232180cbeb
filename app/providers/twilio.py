"""Twilio Programmable Messaging adapter (REST API 2010-04-01) with signed callbacks.

Sources (Twilio's OpenAPI description `twilio_api_v2010.json`, operation CreateMessage; its docs):
- send: `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP basic
  auth with the Account SID and Auth Token; a 201 answers with the Message resource (`sid`);
- errors: a JSON body `{"code": <Twilio error code>, "message": ..., "more_info": ..., "status"}`;
- status callbacks: a form POST to our `StatusCallback` URL with `MessageSid`, `MessageStatus`,
  `ErrorCode` (on failure), `To`, `From`, ... (Twilio adds parameters without notice);
- incoming messages ("Twilio's request to your incoming message Webhook URL"): form fields
  `MessageSid`, `SmsSid` (the same value, deprecated), `AccountSid`, `MessagingServiceSid`, `From`,
  `To`, `Body`, `NumMedia`, `NumSegments`, `ApiVersion`, geographic `FromCity`, `ToCountry`, ...
  (again, Twilio adds parameters without notice); long messages arrive reassembled, in one request;
- signatures ("Webhooks security"): `X-Twilio-Signature` is base64(HMAC-SHA1(auth token, the full
  URL followed by every POST parameter's name and value, sorted by name)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Final, Literal, overload
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, SecretStr

from app.kernel.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    ErrorKind,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    Provider,
    ProviderError,
    StatusReport,
    Submission,
    post_form,
    retry_after_seconds,
)

MESSAGES_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Messages.json"
# FetchMessage: one message's current status, for a message whose final callback never came.
MESSAGE_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"
# The spec's pattern for the Sid path parameter.
MESSAGE_SID_PATTERN: Final = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")
CALLBACK_PATH: Final = "/v1/webhooks/twilio/status"
SIGNATURE_HEADER: Final = "x-twilio-signature"

# The spec's pattern for the AccountSid path parameter; anything else is a configuration error
# that Twilio would answer with 401/404, so we refuse before sending.
ACCOUNT_SID_PATTERN: Final = re.compile(r"^AC[0-9a-fA-F]{32}$")

# A count or code as Twilio writes it: ASCII digits only (`str.isdigit` also accepts characters
# such as '²' that `int` refuses), and few enough that `int` never hits its digit limit.
_SMALL_INT: Final = re.compile(r"[0-9]{1,9}")

# `ValidityPeriod` accepts integers from 1 to 36000 seconds (Twilio's default and maximum, 10 h).
# We clamp rather than omit: a validity longer than 10 h cannot be honoured, and 36000 is what
# Twilio would apply anyway; a validity under 1 s means "barely worth sending", and 1 is the
# closest the API allows (omitting it would silently stretch it to 10 h, the opposite intent).
VALIDITY_MIN_SECONDS: Final = 1
VALIDITY_MAX_SECONDS: Final = 36_000

# Twilio error codes (https://www.twilio.com/docs/api/errors) -> what the worker may do. A code
# decides before the HTTP status does, because Twilio answers some "try later" cases with a 400.
# Twilio's "Too many requests": the account or number is sending faster than allowed.
THROTTLED_ERROR_CODE: Final = 20429

ERROR_CODE_KINDS: Final[Mapping[int, ErrorKind]] = {
    # Twilio did not create the message and says it is safe to try again.
    20429: ErrorKind.RETRYABLE,  # Too many requests: "never processed and always safe to retry"
    20500: ErrorKind.RETRYABLE,  # Internal server error
    20503: ErrorKind.RETRYABLE,  # Service unavailable
    21611: ErrorKind.RETRYABLE,  # 'From' number's queue is full (10 h of messages): it drains
    # Refused for good: the same request can only fail the same way.
    20003: ErrorKind.PERMANENT,  # Authentication failed: needs an operator, not a retry
    20404: ErrorKind.PERMANENT,  # Resource not found (e.g. an Account SID that is not ours)
    21211: ErrorKind.PERMANENT,  # Invalid 'To' phone number
    21266: ErrorKind.PERMANENT,  # 'To' and 'From' are the same number
    21408: ErrorKind.PERMANENT,  # Permission to send to the 'To' number's region not enabled
    21606: ErrorKind.PERMANENT,  # 'From' is not a message-capable Twilio number for this 'To'
    21608: ErrorKind.PERMANENT,  # Trial account: 'To' is not a verified number
    21609: ErrorKind.PERMANENT,  # Invalid StatusCallback URL
    21610: ErrorKind.PERMANENT,  # Attempt to send to an unsubscribed recipient (replied STOP)
    21612: ErrorKind.PERMANENT,  # 'To' not reachable with this 'From'
    21614: ErrorKind.PERMANENT,  # 'To' is not a mobile number
    21617: ErrorKind.PERMANENT,  # Body longer than 1600 characters
    21635: ErrorKind.PERMANENT,  # 'To' is a landline
    21659: ErrorKind.PERMANENT,  # 'From' is not a Twilio number, or short code country mismatch
    30007: ErrorKind.PERMANENT,  # Message filtered by the carrier
}

# Twilio error codes that mean the recipient has opted out, so we record the opt-out as well as
# failing the message. They come back from a send, or, when a Messaging Service sends, in the
# status callback's `ErrorCode`.
OPT_OUT_ERROR_CODES: Final = frozenset(
    {
        21610,  # "Attempt to send to unsubscribed recipient": the recipient replied STOP
    }
)

# HTTP statuses when the body names no code in the table above: Twilio is overloaded or failing
# and did not create the message. Any other 5xx is treated the same; any other 4xx is permanent.
HTTP_STATUS_KINDS: Final[Mapping[int, ErrorKind]] = {
    429: ErrorKind.RETRYABLE,
    500: ErrorKind.RETRYABLE,
    502: ErrorKind.RETRYABLE,
    503: ErrorKind.RETRYABLE,
    # A gateway timeout may come after Twilio created the message: never resend blindly.
    504: ErrorKind.UNKNOWN_OUTCOME,
}

# Twilio `MessageStatus` -> ours. Our SENT means "the provider has it"; queued, accepted,
# scheduled and sending all mean Twilio holds the message and the carrier does not yet, so they
# are SENT too (never SENDING: that is our own "submitting" stage, before Twilio answered).
TWILIO_STATUSES: Final[Mapping[str, MessageStatus | None]] = {
    "accepted": MessageStatus.SENT,  # Messaging Service still choosing a sender
    "scheduled": MessageStatus.SENT,  # held until SendAt
    "queued": MessageStatus.SENT,
    "sending": MessageStatus.SENT,
    "sent": MessageStatus.SENT,  # the carrier accepted it
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,  # WhatsApp/RCS read receipt: delivered, and then some
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
    "canceled": MessageStatus.CANCELED,
    # Some parts reached the handset and some did not: the reader did not get the message we
    # were asked to send, so it is not DELIVERED; the carrier did take it, so not FAILED.
    "partially_delivered": MessageStatus.UNDELIVERED,
    # Inbound statuses: they describe a message someone sent us, never one of ours.
    "receiving": None,
    "received": None,
}


# Reconciliation (ListMessage, `GET` on MESSAGES_PATH): how much of the list to read. Lists are
# newest first; pages stop once they are older than the claim being reconciled.
LIST_PAGE_SIZE: Final = 100
LIST_MAX_PAGES: Final = 5
# Twilio's clock and ours differ: a candidate may look created slightly before our claim.
LOOKUP_CLOCK_SKEW: Final = timedelta(minutes=2)
# Trial accounts prefix every body with this; the rest is ours.
TRIAL_PREFIX: Final = "Sent from your Twilio trial account - "


def compute_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The documented X-Twilio-Signature for `url` and POST `params` under `auth_token`."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    # "surrogatepass": a lone surrogate (valid in JSON, never in what Twilio signs) must make
    # the signature not match, not the check crash.
    payload_bytes = payload.encode("utf-8", "surrogatepass")
    digest = hmac.new(auth_token.encode(), payload_bytes, hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class TwilioSettings(BaseModel):
    """Twilio Programmable Messaging (REST API 2010-04-01): `TWILIO__*`."""

    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    base_url: str = "https://api.twilio.com"


class TwilioProvider(Provider):
    """Sends through Twilio's Messages API and reads its signed status and inbound callbacks."""

    name: ClassVar[str] = "twilio"

    def __init__(
        self, settings: TwilioSettings, http: httpx.AsyncClient, public_base_url: str
    ) -> None:
        self._settings = settings
        self._http = http
        self._callback_url = public_base_url.rstrip("/") + CALLBACK_PATH

    async def send(self, sms: OutboundSms) -> Accepted:
        """Submit one message; raise `ProviderError` when Twilio did not create it."""
        account_sid = self._settings.account_sid
        if not ACCOUNT_SID_PATTERN.fullmatch(account_sid):
            raise ProviderError(
                ErrorKind.PERMANENT,
                "TWILIO__ACCOUNT_SID is not an Account SID (AC followed by 32 hex digits)",
                code="config",
            )
        url = self._settings.base_url.rstrip("/") + MESSAGES_PATH.format(account_sid=account_sid)
        auth = httpx.BasicAuth(account_sid, self._settings.auth_token.get_secret_value())
        response = await post_form(self._http, "Twilio", url, self._form(sms), auth)
        return _accepted_or_raise(response)

    @property
    def can_look_up(self) -> bool:
        """Twilio lists messages (ListMessage)."""
        return True

    async def find_submissions(self, sms: OutboundSms, since: datetime) -> list[Submission]:
        """Messages Twilio holds that could be `sms`: ListMessage filtered by `To`, `From` and
        `DateSent>` (the day of the claim), matched on the body and the creation time.

        A message Twilio holds but has not sent yet (queued behind the sender's rate) has no
        `date_sent`, which a DateSent filter may skip, so the newest page for `To` and `From`
        without a date is read as well. The Message resource does not echo our StatusCallback
        URL, so our message id cannot be matched; the caller tells identical bodies apart by
        the SIDs its other messages already hold.
        """
        account_sid = self._settings.account_sid
        if not ACCOUNT_SID_PATTERN.fullmatch(account_sid):
            raise ProviderError(ErrorKind.PERMANENT, "TWILIO__ACCOUNT_SID is not an Account SID")
        base_url = self._settings.base_url.rstrip("/")
        url = base_url + MESSAGES_PATH.format(account_sid=account_sid)
        auth = httpx.BasicAuth(account_sid, self._settings.auth_token.get_secret_value())
        earliest = since.astimezone(UTC) - LOOKUP_CLOCK_SKEW
        common = {"To": sms.to, "From": sms.sender, "PageSize": str(LIST_PAGE_SIZE)}
        found: dict[str, Submission] = {}
        for params, max_pages in (
            ({**common, "DateSent>": earliest.date().isoformat()}, LIST_MAX_PAGES),
            (common, 1),
        ):
            page_url: str | None = url
            query: dict[str, str] | None = params
            for _ in range(max_pages):
                if page_url is None:
                    break
                page = await self._get_json(page_url, query, auth)
                query = None  # next_page_uri carries the query
                messages = page.get("messages")
                if not isinstance(messages, list):
                    break
                oldest: datetime | None = None
                for item in messages:
                    if not isinstance(item, dict):
                        continue
                    created = _rfc2822(item.get("date_created"))
                    if created is not None:
                        oldest = created if oldest is None else min(oldest, created)
                    submission = _matching(item, sms, created, earliest)
                    if submission is not None:
                        found[submission.provider_message_id] = submission
                next_uri = page.get("next_page_uri")
                if (oldest is not None and oldest < earliest) or not isinstance(next_uri, str):
                    break
                page_url = base_url + next_uri if next_uri.startswith("/2010-04-01/") else None
        return sorted(
            found.values(),
            key=lambda item: item.created_at or datetime.max.replace(tzinfo=UTC),
        )

    @property
    def can_fetch_status(self) -> bool:
        """Twilio returns one message's current status (FetchMessage)."""
        return True

    async def fetch_status(self, provider_message_id: str) -> StatusReport | None:
        """FetchMessage (`GET .../Messages/{Sid}.json`) mapped like a status callback; None for
        a SID Twilio does not know (404) or that is not a Message SID."""
        account_sid = self._settings.account_sid
        if not ACCOUNT_SID_PATTERN.fullmatch(account_sid):
            raise ProviderError(ErrorKind.PERMANENT, "TWILIO__ACCOUNT_SID is not an Account SID")
        if not MESSAGE_SID_PATTERN.fullmatch(provider_message_id):
            return None
        url = self._settings.base_url.rstrip("/") + MESSAGE_PATH.format(
            account_sid=account_sid, sid=provider_message_id
        )
        auth = httpx.BasicAuth(account_sid, self._settings.auth_token.get_secret_value())
        body = await self._get_json(url, None, auth, what="message fetch", missing_ok=True)
        if body is None:
            return None
        provider_status = body.get("status")
        if not isinstance(provider_status, str) or not provider_status:
            raise ProviderError(ErrorKind.RETRYABLE, "Twilio message without a status")
        raw_code = body.get("error_code")
        error_code = (
            str(raw_code)
            if isinstance(raw_code, int | str) and not isinstance(raw_code, bool) and raw_code
            else None
        )
        error_message = body.get("error_message")
        return StatusReport(
            provider_message_id=provider_message_id,
            provider_status=provider_status,
            status=TWILIO_STATUSES.get(provider_status),
            error_code=error_code,
            error_message=error_message
            if isinstance(error_message, str) and error_message
            else None,
            raw={
                "source": "status_check",
                "MessageSid": provider_message_id,
                "MessageStatus": provider_status,
                **({"ErrorCode": error_code} if error_code else {}),
            },
            recipient_opted_out=_is_opt_out_code(error_code),
        )

    @overload
    async def _get_json(
        self,
        url: str,
        params: Mapping[str, str] | None,
        auth: httpx.Auth,
        *,
        what: str = ...,
        missing_ok: Literal[False] = ...,
    ) -> dict[str, Any]: ...

    @overload
    async def _get_json(
        self,
        url: str,
        params: Mapping[str, str] | None,
        auth: httpx.Auth,
        *,
        what: str = ...,
        missing_ok: Literal[True],
    ) -> dict[str, Any] | None: ...

    async def _get_json(
        self,
        url: str,
        params: Mapping[str, str] | None,
        auth: httpx.Auth,
        *,
        what: str = "message list",
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        try:
            response = await self._http.get(
                url, params=params, auth=auth, headers={"Accept": "application/json"}
            )
        except httpx.TransportError as exc:
            raise ProviderError(
                ErrorKind.RETRYABLE, f"Twilio {what} failed: {exc!r}", provider_fault=True
            ) from exc
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code != 200:
            code, message = _error_body(response)
            raise ProviderError(
                ErrorKind.RETRYABLE if response.status_code >= 429 else ErrorKind.PERMANENT,
                message or f"Twilio answered HTTP {response.status_code} to a {what}",
                code=str(code) if code is not None else f"http_{response.status_code}",
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProviderError(ErrorKind.RETRYABLE, f"unreadable Twilio {what}")
        return body

    def _form(self, sms: OutboundSms) -> dict[str, str]:
        # No SmartEncoded: the body's encoding and segment count were decided upstream, and
        # Twilio's character substitution would change both behind our back.
        callback_query = urlencode({"message_id": str(sms.message_id)})
        form = {
            "To": sms.to,
            "From": sms.sender,
            "Body": sms.body,
            # Our id rides in the URL so a callback finds its message even if it arrives before
            # we stored Twilio's SID; Twilio signs this exact URL, query included.
            "StatusCallback": f"{self._callback_url}?{callback_query}",
        }
        if sms.validity_seconds is not None:
            validity = min(max(sms.validity_seconds, VALIDITY_MIN_SECONDS), VALIDITY_MAX_SECONDS)
            form["ValidityPeriod"] = str(validity)
        return form

    def verify_callback(self, request: CallbackRequest) -> bool:
        """True only when X-Twilio-Signature matches the URL and parameters under our token.

        For a POST, `request.params` must be the form fields exactly as received (every one,
        including any Twilio adds later) and the query string stays in `request.url`. For a GET
        the parameters are in the URL already, so only the URL is signed.
        """
        auth_token = self._settings.auth_token.get_secret_value()
        signature = request.headers.get(SIGNATURE_HEADER, "")
        if not auth_token or not signature:
            return False
        params: Mapping[str, str] = request.params if request.method.upper() == "POST" else {}
        # Compare every candidate, valid or not, so timing does not tell which variant matched.
        matches = [
            hmac.compare_digest(
                compute_signature(auth_token, url, params).encode(),
                signature.encode("utf-8", "surrogatepass"),
            )
            for url in _url_variants(request.url)
        ]
        return any(matches)

    def parse_status_callback(self, request: CallbackRequest) -> StatusReport:
        """Map a status callback to a report; raise `InvalidCallback` without SID or status."""
        params = request.params
        provider_message_id = params.get("MessageSid", "")
        provider_status = params.get("MessageStatus", "")
        error_code = params.get("ErrorCode") or None
        if not provider_message_id or not provider_status:
            raise InvalidCallback("Twilio status callback without MessageSid or MessageStatus")
        return StatusReport(
            provider_message_id=provider_message_id,
            provider_status=provider_status,
            # An undocumented status is recorded rather than refused: refusing makes Twilio retry.
            status=TWILIO_STATUSES.get(provider_status),
            message_id=_message_id_from_url(request.url),
            error_code=error_code,
            error_message=params.get("ErrorMessage") or None,
            raw=dict(params),
            recipient_opted_out=_is_opt_out_code(error_code),
        )

    def parse_inbound(self, request: CallbackRequest) -> InboundSms:
        """Read an incoming-message webhook; raise `InvalidCallback` without SID, From or To."""
        params = request.params
        provider_message_id = params.get("MessageSid", "")
        sender = params.get("From", "")
        to = params.get("To", "")
        if not provider_message_id or not sender or not to:
            raise InvalidCallback("Twilio incoming message without MessageSid, From or To")
        return InboundSms(
            provider_message_id=provider_message_id,
            # Twilio sends E.164 numbers, or a channel address such as "whatsapp:+1...": as given.
            from_=sender,
            to=to,
            body=params.get("Body", ""),
            num_segments=_positive_int(params.get("NumSegments")),
            # Twilio reassembles long messages before calling us, so there are never parts.
            part=None,
            raw=dict(params),
        )


def _url_variants(url: str) -> list[str]:
    """The URL as called, plus it with the port dropped or the default port added.

    Twilio documents that it drops the port from HTTPS URLs before signing SMS callbacks, yet
    some callbacks are signed with it; its own SDKs accept either form, and so do we.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return [url]
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    if port is not None:
        other = urlunsplit(parts._replace(netloc=host))
    else:
        default = {"https": 443, "http": 80}.get(parts.scheme)
        if default is None:
            return [url]
        other = urlunsplit(parts._replace(netloc=f"{host}:{default}"))
    return [url, other]


def _rfc2822(value: object) -> datetime | None:
    """A Twilio timestamp (`Fri, 24 May 2019 17:44:46 +0000`), or None."""
    if not isinstance(value, str):
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _matching(
    item: Mapping[str, Any], sms: OutboundSms, created: datetime | None, earliest: datetime
) -> Submission | None:
    """The listed message as a `Submission` when it could be `sms`, else None."""
    sid = item.get("sid")
    body = item.get("body")
    direction = item.get("direction")
    if not isinstance(sid, str) or not sid or not isinstance(body, str):
        return None
    if isinstance(direction, str) and not direction.startswith("outbound"):
        return None
    if item.get("to") != sms.to or item.get("from") != sms.sender:
        return None
    if body != sms.body and body.removeprefix(TRIAL_PREFIX) != sms.body:
        return None
    if created is None or created < earliest:
        return None
    provider_status = str(item.get("status") or "")
    return Submission(
        provider_message_id=sid,
        provider_status=provider_status,
        status=TWILIO_STATUSES.get(provider_status),
        created_at=created,
    )


def _is_opt_out_code(error_code: str | None) -> bool:
    """True when a callback's `ErrorCode` is one of `OPT_OUT_ERROR_CODES`."""
    if error_code is None or not _SMALL_INT.fullmatch(error_code):
        return False
    return int(error_code) in OPT_OUT_ERROR_CODES


def _positive_int(value: str | None) -> int | None:
    """A count Twilio sends as text, or None when it is absent, not a number, or zero."""
    if value is None or not _SMALL_INT.fullmatch(value):
        return None
    number = int(value)
    # A received message has at least one segment: 0 would mean "unknown", which None says.
    return number if number > 0 else None


def _message_id_from_url(url: str) -> uuid.UUID | None:
    values = parse_qs(urlsplit(url).query).get("message_id")
    if not values:
        return None
    try:
        return uuid.UUID(values[0])
    except ValueError:
        return None


def _accepted_or_raise(response: httpx.Response) -> Accepted:
    status_code = response.status_code
    if response.is_success:
        return _accepted(response)
    if not 400 <= status_code < 600:
        # Redirects and the like: not an answer Twilio documents for this call, so we cannot
        # tell whether the message was created.
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME,
            f"unexpected HTTP {status_code} from Twilio",
            code=f"http_{status_code}",
        )
    twilio_code, message = _error_body(response)
    kind = ERROR_CODE_KINDS.get(twilio_code) if twilio_code is not None else None
    if kind is None:
        kind = HTTP_STATUS_KINDS.get(status_code)
    if kind is None:
        kind = ErrorKind.RETRYABLE if status_code >= 500 else ErrorKind.PERMANENT
    raise ProviderError(
        kind,
        message or f"Twilio answered HTTP {status_code}",
        code=str(twilio_code) if twilio_code is not None else f"http_{status_code}",
        retry_after=retry_after_seconds(response.headers) if kind is ErrorKind.RETRYABLE else None,
        recipient_opted_out=twilio_code in OPT_OUT_ERROR_CODES,
        throttled=status_code == 429 or twilio_code == THROTTLED_ERROR_CODE,
        provider_fault=status_code >= 500,
    )


def _accepted(response: httpx.Response) -> Accepted:
    try:
        body = response.json()
    except ValueError:
        body = None
    sid = body.get("sid") if isinstance(body, dict) else None
    if not isinstance(sid, str) or not sid:
        # Twilio answered success, so the message probably exists; without its SID we cannot
        # be sure, and resending could deliver it twice.
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME,
            f"unreadable Twilio response (HTTP {response.status_code}): {response.text[:200]!r}",
        )
    return Accepted(provider_message_id=sid)


def _error_body(response: httpx.Response) -> tuple[int | None, str | None]:
    """Twilio's error `code` and `message`, when the body is the documented JSON shape."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("code")
    message = body.get("message")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        message if isinstance(message, str) and message else None,
    )
