"""Request and response bodies of the public API, with the examples shown at /docs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from app.api.params import CURSOR_EXAMPLE
from app.db.models import Sender
from app.domain.keywords import KeywordConfig, missing_replies
from app.domain.phone import InvalidPhoneNumber, normalize_phone
from app.domain.senders import ProviderName, SenderKind
from app.domain.status import MessageStatus
from app.domain.text import StorableStr
from app.errors import Problem
from app.settings import get_settings

PHONE_CACHE = "phone_cache"
"""Validation-context key of a dict in which `E164` keeps each number it judged (or why it
refused it), so a batch validates each distinct number once."""


def _to_e164(raw: str, info: ValidationInfo) -> str:
    cache = info.context.get(PHONE_CACHE) if isinstance(info.context, dict) else None
    if cache is None:
        return normalize_phone(raw, get_settings().default_region)
    known: str | InvalidPhoneNumber | None = cache.get(raw)
    if known is None:
        try:
            known = normalize_phone(raw, get_settings().default_region)
        except InvalidPhoneNumber as error:
            known = error
        cache[raw] = known
    if isinstance(known, InvalidPhoneNumber):
        raise InvalidPhoneNumber(str(known))
    return known


E164 = Annotated[
    str,
    Field(min_length=1, max_length=40, examples=["+14155550123"]),
    AfterValidator(_to_e164),
]
"""A phone number in any common format, validated and normalised to E.164."""

MAX_METADATA_KEYS = 20

_MESSAGE_EXAMPLE: dict[str, Any] = {
    "id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10",
    "status": "delivered",
    "to": "+14155550123",
    "from": "+14155550100",
    "body": "Your order #1042 has shipped.",
    "encoding": "GSM-7",
    "segments": 1,
    "provider": "twilio",
    "provider_message_id": "SM0123456789abcdef0123456789abcdef",
    "error_code": None,
    "error_message": None,
    "callback_url": None,
    "validity_period": None,
    "expires_at": None,
    "metadata": {"order_id": "1042"},
    "created_at": "2026-11-26T10:00:00Z",
    "updated_at": "2026-11-26T10:00:03Z",
}
_SENDER_EXAMPLE: dict[str, Any] = {
    "id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
    "address": "+14155550100",
    "kind": "long_code",
    "provider": "twilio",
    "fallback_provider": None,
    "rate_per_second": 1.0,
    "description": "US order notifications",
    "keywords": {
        "opt_out": {
            "keywords": {
                "en": [
                    "STOP",
                    "STOPALL",
                    "UNSUBSCRIBE",
                    "CANCEL",
                    "END",
                    "QUIT",
                    "REVOKE",
                    "OPTOUT",
                ],
                "fr": ["ARRET", "ARRETE", "DESABONNER"],
            },
            "replies": {"en": "Unsubscribed. Reply START to resubscribe."},
        },
        "opt_in": {"keywords": {"en": ["START", "UNSTOP"]}, "replies": {}},
        "help": {
            "keywords": {"en": ["HELP", "INFO"], "fr": ["AIDE"]},
            "replies": {"en": "ACME orders. Reply STOP to unsubscribe."},
        },
        "custom": [],
    },
    "missing_replies": ["help/fr", "opt_out/fr"],
    "created_at": "2026-11-26T09:00:00Z",
    "updated_at": "2026-11-26T09:00:00Z",
}
_OPT_OUT_EVENT_EXAMPLE: dict[str, Any] = {
    "id": 17,
    "phone": "+14155550123",
    "sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
    "action": "opt_out",
    "source": "keyword",
    "actor": "recipient",
    "detail": "STOP to +14155550100",
    "created_at": "2026-11-26T10:05:00Z",
}
_INBOUND_EXAMPLE: dict[str, Any] = {
    "id": "9d1c7e52-60f3-4b55-8f0e-1d2c3b4a5f60",
    "provider": "twilio",
    "provider_message_id": "SMfedcba9876543210fedcba9876543210",
    "sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
    "to": "+14155550100",
    "from": "+14155550123",
    "body": "Stop",
    "num_segments": 1,
    "keyword": "STOP",
    "keyword_category": "opt_out",
    "language": "en",
    "reply_message_id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f11",
    "created_at": "2026-11-26T10:05:00Z",
}


class SendMessageRequest(BaseModel):
    """A message to send."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "to": "+14155550123",
                    "from": "+14155550100",
                    "body": "Your order #1042 has shipped.",
                    "metadata": {"order_id": "1042"},
                }
            ]
        },
    )

    to: E164 = Field(description="Recipient; national formats use the default region.")
    from_: StorableStr | None = Field(
        default=None,
        alias="from",
        max_length=20,
        description="One of the service's senders; defaults to your client's default sender.",
    )
    body: StorableStr = Field(min_length=1, max_length=10_000, description="The text to send.")
    callback_url: AnyHttpUrl | None = Field(
        default=None,
        description="Where this message's status changes are sent as signed events (instead "
        "of your default endpoint): an https URL on the public internet, checked now and "
        "before each attempt.",
    )
    validity_period: StrictInt | None = Field(
        default=None,
        ge=1,
        le=604_800,
        description="Seconds after acceptance during which the message may still be sent; "
        "past it the message ends as `expired`.",
    )
    metadata: dict[StorableStr, StorableStr] = Field(
        default_factory=dict,
        description=f"Up to {MAX_METADATA_KEYS} string pairs of yours, returned as given.",
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for key, item in value.items():
            if not 1 <= len(key) <= 40:
                raise ValueError("keys are 1 to 40 characters")
            if len(item) > 500:
                raise ValueError(f"value of {key!r} is longer than 500 characters")
        return value


class StatusChange(BaseModel):
    """One step of a message's status history."""

    model_config = ConfigDict(from_attributes=True)

    status: MessageStatus
    source: str = Field(examples=["worker"])
    detail: str | None = None
    error_code: str | None = None
    created_at: datetime


class HistoryNote(BaseModel):
    """Something decided or heard about a message that did not change its status."""

    model_config = ConfigDict(from_attributes=True)

    status: MessageStatus | None = Field(
        description="The status a provider reported, for a report that changed nothing "
        "(a duplicate, or one that came late); None for a decision."
    )
    source: str = Field(examples=["reconcile"])
    detail: str | None = Field(
        description="What happened: an unknown outcome, a reconciliation lookup and its "
        "answer, a status check, a failover, why it waited (one note counts a run of waits)."
    )
    error_code: str | None = None
    created_at: datetime


class MessageOut(BaseModel):
    """A message and where it is in its lifecycle."""

    model_config = ConfigDict(
        from_attributes=True,
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10",
                    "status": "queued",
                    "to": "+14155550123",
                    "from": "+14155550100",
                    "body": "Your order #1042 has shipped.",
                    "encoding": "GSM-7",
                    "segments": 1,
                    "provider": "twilio",
                    "provider_message_id": None,
                    "error_code": None,
                    "error_message": None,
                    "status_detail": None,
                    "callback_url": None,
                    "validity_period": None,
                    "expires_at": None,
                    "metadata": {"order_id": "1042"},
                    "created_at": "2026-11-26T10:00:00Z",
                    "updated_at": "2026-11-26T10:00:00Z",
                }
            ]
        },
    )

    id: uuid.UUID
    status: MessageStatus
    to: str
    from_: str = Field(alias="from", validation_alias="from_")
    body: str
    encoding: str = Field(examples=["GSM-7"])
    segments: int
    provider: str
    provider_message_id: str | None
    error_code: str | None
    error_message: str | None
    status_detail: str | None = Field(
        default=None,
        description="Why the service stopped looking after this message's status, e.g. status "
        "checks stopped after STATUS_CHECK_HORIZON_HOURS without a final report (the message "
        "stays `sent`; a report that arrives later still applies and clears this).",
    )
    callback_url: str | None
    validity_period: int | None
    expires_at: datetime | None
    metadata: dict[str, Any] = Field(validation_alias="metadata_")
    created_at: datetime
    updated_at: datetime


class MessageDetail(MessageOut):
    """A message with its status history, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_MESSAGE_EXAMPLE,
                    "history": [
                        {
                            "status": "queued",
                            "source": "api",
                            "detail": None,
                            "error_code": None,
                            "created_at": "2026-11-26T10:00:00Z",
                        },
                        {
                            "status": "sending",
                            "source": "worker",
                            "detail": "attempt 1",
                            "error_code": None,
                            "created_at": "2026-11-26T10:00:00.05Z",
                        },
                        {
                            "status": "sent",
                            "source": "worker",
                            "detail": "accepted by twilio as SM0123456789abcdef0123456789abcdef",
                            "error_code": None,
                            "created_at": "2026-11-26T10:00:00.3Z",
                        },
                        {
                            "status": "delivered",
                            "source": "twilio",
                            "detail": None,
                            "error_code": None,
                            "created_at": "2026-11-26T10:00:03Z",
                        },
                    ],
                    "notes": [
                        {
                            "status": None,
                            "source": "worker",
                            "detail": "not sent: the sender's pace; next turn in 0.4s "
                            "(3 times since 10:00:00 UTC)",
                            "error_code": None,
                            "created_at": "2026-11-26T10:00:00.02Z",
                        }
                    ],
                }
            ]
        }
    )

    history: list[StatusChange]
    notes: list[HistoryNote] = Field(
        description="Decisions and reports that changed no status, oldest first: they explain "
        "a message that waits or stays `sending`."
    )


class MessagePage(BaseModel):
    """A page of messages, newest first. Pass `next_cursor` as `cursor` for the next page."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [_MESSAGE_EXAMPLE],
                    "has_more": True,
                    "next_cursor": CURSOR_EXAMPLE,
                }
            ]
        }
    )

    data: list[MessageOut]
    has_more: bool
    next_cursor: str | None


MAX_BATCH_MESSAGES = 1000


class SendBatchRequest(BaseModel):
    """Up to 1,000 messages, each one what `POST /v1/messages` takes, each judged on its own."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {
                            "to": "+14155550123",
                            "body": "Your order #1042 has shipped.",
                            "metadata": {"order_id": "1042"},
                        },
                        {
                            "to": "+14155550124",
                            "from": "+14155550100",
                            "body": "Your order #1043 has shipped.",
                            "validity_period": 3600,
                        },
                    ]
                }
            ]
        },
    )

    # Left as sent: the endpoint validates each message on its own, so that a bad one is refused
    # alone rather than the batch. /docs shows each as what it must be: the single send's body.
    messages: list[Any] = Field(
        min_length=1,
        max_length=MAX_BATCH_MESSAGES,
        description=f"1 to {MAX_BATCH_MESSAGES} messages, each a `POST /v1/messages` body; "
        "results come back in this order.",
        json_schema_extra={"items": {"$ref": "#/components/schemas/SendMessageRequest"}},
    )


class BatchAccepted(BaseModel):
    """A message of the batch that was stored and queued."""

    index: int = Field(description="Its position in `messages`, from 0.", examples=[0])
    status: Literal["accepted"]
    message: MessageOut


class BatchRejected(BaseModel):
    """A message of the batch that was refused; nothing was stored for it."""

    index: int = Field(description="Its position in `messages`, from 0.", examples=[1])
    status: Literal["rejected"]
    error: Problem = Field(
        description="Why: the problem `POST /v1/messages` would have answered for this message."
    )


class BatchResult(BaseModel):
    """One result per message, in request order, and how many were accepted and rejected."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {
                            "index": 0,
                            "status": "accepted",
                            "message": {
                                **_MESSAGE_EXAMPLE,
                                "status": "queued",
                                "provider_message_id": None,
                                "updated_at": "2026-11-26T10:00:00Z",
                            },
                        },
                        {
                            "index": 1,
                            "status": "rejected",
                            "error": {
                                "type": "about:blank",
                                "title": "Refused",
                                "status": 403,
                                "code": "recipient_opted_out",
                                "detail": "+14155550124 has opted out of messages from "
                                "+14155550100",
                            },
                        },
                        {
                            "index": 2,
                            "status": "rejected",
                            "error": {
                                "type": "about:blank",
                                "title": "Invalid request",
                                "status": 422,
                                "code": "validation_error",
                                "detail": "to: cannot receive SMS: it is a fixed-line number",
                                "errors": [
                                    {
                                        "field": "to",
                                        "reason": "cannot receive SMS: it is a fixed-line number",
                                    }
                                ],
                            },
                        },
                    ],
                    "accepted": 1,
                    "rejected": 2,
                }
            ]
        }
    )

    data: list[Annotated[BatchAccepted | BatchRejected, Field(discriminator="status")]]
    accepted: int
    rejected: int


class PreviewRequest(BaseModel):
    """A body to analyse without sending."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"body": "Ça coûte 5€"}]}
    )

    body: StorableStr = Field(min_length=1, max_length=10_000)


class PreviewOut(BaseModel):
    """How a body would be encoded and how many segments it costs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "encoding": "UCS-2",
                    "segments": 1,
                    "units": 11,
                    "non_gsm_characters": ["û"],
                    "max_segments": 10,
                    "within_limit": True,
                }
            ]
        }
    )

    encoding: str
    segments: int
    units: int = Field(description="GSM-7 septets or UCS-2 code units in the whole body.")
    non_gsm_characters: list[str] = Field(description="Characters that forced UCS-2.")
    max_segments: int
    within_limit: bool


class SenderIn(BaseModel):
    """A new sender."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"address": "+14155550100", "kind": "long_code", "provider": "twilio"}]
        },
    )

    address: StorableStr = Field(min_length=1, max_length=40)
    kind: SenderKind
    provider: ProviderName
    fallback_provider: ProviderName | None = Field(
        default=None,
        description="Where this sender's messages go while its provider's circuit breaker is "
        "open (the provider is failing); none when omitted.",
    )
    rate_per_second: StrictFloat | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="Messages per second this sender may submit, across all workers; by "
        "default 1 for a long code, 3 for a toll-free number, 100 for a short code, 10 for an "
        "alphanumeric ID.",
        examples=[1.0],
    )
    description: StorableStr | None = Field(default=None, max_length=200)
    keywords: KeywordConfig = Field(
        default_factory=KeywordConfig,
        description="Keyword sets and replies; the built-in sets (English and French) when "
        "omitted. The sender cannot send until its opt-out and help replies are configured.",
    )


class SenderPatch(BaseModel):
    """Changes to a sender; omitted fields stay as they are."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"provider": "vonage"}]}
    )

    provider: ProviderName | None = None
    fallback_provider: ProviderName | None = Field(
        default=None, description="A fallback provider; `null` removes it, omitted keeps it."
    )
    rate_per_second: StrictFloat | None = Field(
        default=None, gt=0, le=10_000, description="Messages per second, across all workers."
    )
    description: StorableStr | None = Field(default=None, max_length=200)
    keywords: KeywordConfig | None = Field(
        default=None, description="Replaces the sender's whole keyword configuration."
    )


class SenderOut(BaseModel):
    """A sender."""

    model_config = ConfigDict(json_schema_extra={"examples": [_SENDER_EXAMPLE]})

    id: uuid.UUID
    address: str
    kind: SenderKind
    provider: ProviderName
    fallback_provider: ProviderName | None = Field(
        description="Where messages go while the provider's circuit breaker is open."
    )
    rate_per_second: float = Field(description="Messages per second, across all workers.")
    description: str | None
    keywords: KeywordConfig
    missing_replies: list[str] = Field(
        description="Replies still to configure before the sender may send; empty when ready.",
        examples=[["help/fr", "opt_out/fr"]],
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, sender: Sender, *, accept_default_replies: bool) -> SenderOut:
        """The resource for a sender row, with what it still lacks to send."""
        keywords = KeywordConfig.model_validate(sender.keywords)
        return cls(
            id=sender.id,
            address=sender.address,
            kind=SenderKind(sender.kind),
            provider=ProviderName(sender.provider),
            fallback_provider=(
                ProviderName(sender.fallback_provider) if sender.fallback_provider else None
            ),
            rate_per_second=sender.rate_per_second,
            description=sender.description,
            keywords=keywords,
            missing_replies=missing_replies(keywords, accept_defaults=accept_default_replies),
            created_at=sender.created_at,
            updated_at=sender.updated_at,
        )


class SenderList(BaseModel):
    """Every sender."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_SENDER_EXAMPLE]}]})

    data: list[SenderOut]


class SenderClients(BaseModel):
    """The clients a sender is granted to: they may send from it, name it in opt-outs and read
    its inbound messages."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b", "clients": ["billing"]}
            ]
        }
    )

    sender_id: uuid.UUID
    clients: list[str] = Field(description="Client names, alphabetically.")


class InboundOut(BaseModel):
    """A message a customer sent to one of our addresses."""

    model_config = ConfigDict(
        from_attributes=True,
        populate_by_name=True,
        json_schema_extra={"examples": [_INBOUND_EXAMPLE]},
    )

    id: uuid.UUID
    provider: str
    provider_message_id: str
    sender_id: uuid.UUID | None = Field(description="None when sent to an unknown address.")
    to: str
    from_: str = Field(alias="from", validation_alias="from_")
    body: str
    num_segments: int | None
    keyword: str | None = Field(description="The keyword matched, normalised.", examples=["ARRET"])
    keyword_category: str | None = Field(examples=["opt_out"])
    language: str | None = Field(examples=["fr"])
    reply_message_id: uuid.UUID | None = Field(
        description="Our reply: an ordinary message (admin keys read it at /v1/messages/{id})."
    )
    created_at: datetime


class InboundPage(BaseModel):
    """A page of inbound messages, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": [_INBOUND_EXAMPLE], "has_more": False, "next_cursor": None}]
        }
    )

    data: list[InboundOut]
    has_more: bool
    next_cursor: str | None


class OptOutEvent(BaseModel):
    """One row of a number's opt-out history."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_OPT_OUT_EVENT_EXAMPLE]}
    )

    id: int
    phone: str
    sender_id: uuid.UUID | None = Field(description="None: applies to every sender.")
    action: str = Field(examples=["opt_out"])
    source: str = Field(examples=["keyword"])
    actor: str | None = Field(examples=["recipient"])
    detail: str | None = Field(examples=["STOP to +14155550100"])
    created_at: datetime


class SenderOptOut(BaseModel):
    """Whether a number is opted out of one sender (the service-wide rows included)."""

    sender_id: uuid.UUID
    opted_out: bool


class OptOutStatus(BaseModel):
    """Whether a number is opted out (of one sender, or service-wide), and its history."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "phone": "+14155550123",
                    "sender_id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
                    "opted_out": True,
                    "history": [_OPT_OUT_EVENT_EXAMPLE],
                }
            ]
        }
    )

    phone: str
    sender_id: uuid.UUID | None
    opted_out: bool = Field(
        description="Of this sender; without `sender_id`, service-wide (admin key) or of every "
        "one of your client's senders (client key)."
    )
    history: list[OptOutEvent] = Field(
        description="Newest first. A client key sees the rows of its client's senders and the "
        "service-wide rows, with actors other than itself, recipients and providers hidden."
    )
    senders: list[SenderOptOut] | None = Field(
        default=None,
        description="A client key without `sender_id`: the state for each of its senders.",
    )


class OptOutPage(BaseModel):
    """Current opt-outs (the newest row of each number and scope is an opt-out), newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": [_OPT_OUT_EVENT_EXAMPLE], "has_more": False, "next_cursor": None}]
        }
    )

    data: list[OptOutEvent]
    has_more: bool
    next_cursor: str | None


class ImportLineError(BaseModel):
    """A CSV line that was not imported, and why."""

    line: int
    value: str
    reason: str


class OptOutImportResult(BaseModel):
    """What a bulk import recorded; lines with errors were skipped, the rest recorded unless
    the number was already opted out in that scope (`unchanged`: no second history row)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "recorded": 2,
                    "unchanged": 1,
                    "errors": [
                        {
                            "line": 4,
                            "value": "+1 415 555",
                            "reason": "impossible number: it is too short",
                        }
                    ],
                }
            ]
        }
    )

    recorded: int = Field(description="Opt-outs recorded (history rows added).")
    unchanged: int = Field(
        description="Valid lines that changed nothing: the number was already opted out in "
        "that scope, or the line repeats an earlier one."
    )
    errors: list[ImportLineError]
