"""The one interface every SMS provider adapter implements.

An adapter turns an `OutboundSms` into one HTTP call to its provider and either returns the
provider's id for it or raises `ProviderError` classified as retryable, permanent, or of unknown
outcome (the request may have reached the provider). It also verifies and parses the provider's
status callbacks into a `StatusReport`. Adapters hold no database state.
"""

from __future__ import annotations

import abc
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import ClassVar

import httpx

from app.kernel.status import MessageStatus


class Encoding(StrEnum):
    """How a body is carried on the air interface."""

    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


@dataclass(frozen=True, slots=True)
class OutboundSms:
    """Everything an adapter needs to submit one message."""

    message_id: uuid.UUID
    to: str  # E.164, with the leading '+'
    sender: str  # our sender's address: E.164, short code, or alphanumeric ID
    body: str
    encoding: Encoding
    validity_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """The provider took the message; its id lets us match later callbacks."""

    provider_message_id: str
    # Every part's id, in order, when the provider split the message and reports on each part
    # on its own (Vonage); empty otherwise. Such a message settles from all its parts.
    part_ids: tuple[str, ...] = ()


class ErrorKind(StrEnum):
    """What the worker may do after a failed submission."""

    RETRYABLE = "retryable"  # nothing was sent (or the provider said "try later"): retry
    PERMANENT = "permanent"  # the provider refused this message for good: fail it
    UNKNOWN_OUTCOME = "unknown_outcome"  # the request may have been sent: never resend blindly


class ProviderError(Exception):
    """A submission that did not succeed, with what it means for retrying."""

    def __init__(
        self,
        kind: ErrorKind,
        detail: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        recipient_opted_out: bool = False,
        throttled: bool = False,
        provider_fault: bool = False,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.code = code
        self.retry_after = retry_after
        # The provider refused because the recipient unsubscribed there (e.g. Twilio 21610):
        # we record the opt-out too, so we stop trying.
        self.recipient_opted_out = recipient_opted_out
        # The provider said "too fast" (HTTP 429 or its own code): a rate-limit deferral.
        self.throttled = throttled
        # The provider itself is failing (a timeout, a connection error, a 5xx), as opposed to
        # refusing this message: what its circuit breaker counts (app.delivery.circuit).
        self.provider_fault = provider_fault


@dataclass(frozen=True, slots=True)
class Submission:
    """A message the provider holds, found by asking it (reconciliation of unknown outcomes)."""

    provider_message_id: str
    provider_status: str
    status: MessageStatus | None  # the provider's status mapped to ours, as a report would be
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CallbackRequest:
    """A provider's webhook call, reduced to what signature checks and parsing need."""

    url: str  # the public URL the provider called, including the query string
    method: str
    params: Mapping[str, str]  # query parameters (GET) or form/JSON fields (POST), flattened
    headers: Mapping[str, str]  # lower-cased names
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One delivery report from a provider, mapped to our status vocabulary."""

    provider_message_id: str
    provider_status: str
    status: MessageStatus | None  # None: a report we record but that maps to no status of ours
    message_id: uuid.UUID | None = None  # our id, when the provider echoes it back
    error_code: str | None = None
    error_message: str | None = None
    raw: Mapping[str, str] = field(default_factory=dict)
    # The report says the recipient opted out at the provider or carrier (e.g. Vonage err-code 9).
    recipient_opted_out: bool = False
    # The report is about one part of a message the provider may have split (a Vonage receipt,
    # `provider_message_id` being the part's): a long message settles from all its parts.
    per_part: bool = False


@dataclass(frozen=True, slots=True)
class InboundPart:
    """Where one part of a concatenated inbound message belongs."""

    reference: str  # the same for every part of one message from one sender
    total: int
    number: int  # 1-based


@dataclass(frozen=True, slots=True)
class InboundSms:
    """A message a customer sent to one of our numbers, as the provider delivered it."""

    provider_message_id: str
    from_: str  # the customer's number, E.164 with '+' when it is a phone number
    to: str  # our address as the provider gave it (E.164 with '+', or a short code / ID)
    body: str
    num_segments: int | None = None
    part: InboundPart | None = None  # set when the provider delivers a long message in parts
    raw: Mapping[str, str] = field(default_factory=dict)


# Failures that happen before any byte of the request reached the provider: safe to retry.
# (UnsupportedProtocol and LocalProtocolError are raised while preparing the request: a
# misconfigured base URL is retried, then fails, and never counts as "maybe sent".)
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


async def post_form(
    http: httpx.AsyncClient,
    provider: str,
    url: str,
    form: Mapping[str, str],
    auth: httpx.Auth | None = None,
) -> httpx.Response:
    """POST a form to a provider, classifying transport failures for the worker.

    A failure before the request left is retryable; any later one (read or write timeout, dropped
    connection, protocol error) may come after the provider accepted the message, so its outcome
    is unknown and it must not be resent blindly.
    """
    try:
        return await http.post(
            url,
            data=dict(form),
            auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
            headers={"Accept": "application/json"},
        )
    except _NOT_SENT as exc:
        raise ProviderError(
            ErrorKind.RETRYABLE,
            f"request not sent: {exc!r}",
            provider_fault=isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout),
        ) from exc
    except httpx.TransportError as exc:
        raise ProviderError(
            ErrorKind.UNKNOWN_OUTCOME, f"no response from {provider}: {exc!r}", provider_fault=True
        ) from exc


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """A `Retry-After` header (seconds or an HTTP date) as seconds from now, if present."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means none was given
        return None
    return max(when.timestamp() - time.time(), 0.0)


class InvalidCallback(Exception):
    """A callback that is signed correctly but cannot be understood."""


class Provider(abc.ABC):
    """A provider adapter. Subclasses live one per module in `app.providers`."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def send(self, sms: OutboundSms) -> Accepted:
        """Submit one message; raise `ProviderError` when it was not accepted."""

    @abc.abstractmethod
    def verify_callback(self, request: CallbackRequest) -> bool:
        """True only when the callback carries a valid signature from this provider."""

    @abc.abstractmethod
    def parse_status_callback(self, request: CallbackRequest) -> StatusReport:
        """Map a verified status callback to a report; raise `InvalidCallback` if malformed."""

    @abc.abstractmethod
    def parse_inbound(self, request: CallbackRequest) -> InboundSms:
        """Read a verified inbound-message webhook; raise `InvalidCallback` if malformed."""

    @property
    def can_look_up(self) -> bool:
        """Whether `find_submissions` can ask the provider which messages it holds."""
        return False

    async def find_submissions(self, sms: OutboundSms, since: datetime) -> list[Submission]:
        """Messages the provider holds that could be `sms` (same recipient, sender and body),
        created after `since`, oldest first; raise `ProviderError` when it cannot answer.

        Only for adapters with `can_look_up`; reconciliation never resends a message whose
        provider cannot be asked.
        """
        raise NotImplementedError(f"{self.name} offers no way to look messages up")

    @property
    def can_fetch_status(self) -> bool:
        """Whether `fetch_status` can ask the provider for a message's current status."""
        return False

    async def fetch_status(self, provider_message_id: str) -> StatusReport | None:
        """The provider's current status of one message, as a status callback would report it;
        None when it cannot say (no lookup, or no such message). Raises `ProviderError` when it
        cannot answer now. Used for messages whose final callback never came."""
        return None
