"""Request and response bodies of sending: single sends, batches, messages and previews."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
)

from app.kernel.errors import Problem
from app.kernel.phone import E164
from app.kernel.status import MessageStatus
from app.kernel.text import StorableStr
from app.traffic.schedule import send_at_problem
from app.web.params import CURSOR_EXAMPLE

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
    "send_at": None,
    "metadata": {"order_id": "1042"},
    "created_at": "2026-11-26T10:00:00Z",
    "updated_at": "2026-11-26T10:00:03Z",
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
                },
                {
                    "to": "+14155550123",
                    "body": "Your appointment is tomorrow at 10:00.",
                    "send_at": "2026-11-27T18:00:00+01:00",
                    "validity_period": 3600,
                },
                {
                    "to": "+33612345678",
                    "body": "Your weekly summary is ready.",
                    "respect_quiet_hours": True,
                },
            ]
        },
    )

    to: E164 = Field(description="Recipient; national formats use the default region.")
    from_: StorableStr | None = Field(
        default=None,
        alias="from",
        max_length=20,
        description="One of your senders. Omitted: your client's default sender, or without "
        "one, a sender of your pool serving the recipient's country, the same one for the same "
        'recipient every time (README "Sender pools"; `422 no_sender_for_destination` when '
        "none serves it).",
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
    send_at: AwareDatetime | None = Field(
        default=None,
        description="When to send it: an RFC 3339 time with its offset, at least 60 seconds and "
        "at most 35 days ahead. The message is `scheduled` until then (cancel it with "
        "`POST /v1/messages/{id}/cancel`); its `validity_period` counts from this time.",
        examples=["2026-11-27T18:00:00+01:00"],
    )
    respect_quiet_hours: bool = Field(
        default=False,
        description="A non-urgent message: when your client has quiet hours (set by an admin) "
        "and the recipient's local time is inside them at the time of sending, it is scheduled "
        "for the end of the window. Without it a message is never delayed.",
    )

    @field_validator("send_at", mode="before")
    @classmethod
    def _rfc3339_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an RFC 3339 time with an offset, as text")
        return value

    @field_validator("send_at")
    @classmethod
    def _within_bounds(cls, value: datetime | None) -> datetime | None:
        if value is not None and (problem := send_at_problem(value, datetime.now(UTC))):
            raise ValueError(problem)
        return value

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
                    "send_at": None,
                    "metadata": {"order_id": "1042"},
                    "created_at": "2026-11-26T10:00:00Z",
                    "updated_at": "2026-11-26T10:00:00Z",
                },
                {
                    "id": "0c1d7a43-55a2-4f0e-9d7b-4c2b8f3e6a21",
                    "status": "scheduled",
                    "to": "+14155550123",
                    "from": "+14155550100",
                    "body": "Your appointment is tomorrow at 10:00.",
                    "encoding": "GSM-7",
                    "segments": 1,
                    "provider": "twilio",
                    "provider_message_id": None,
                    "error_code": None,
                    "error_message": None,
                    "status_detail": None,
                    "callback_url": None,
                    "validity_period": 3600,
                    "expires_at": "2026-11-27T18:00:00Z",
                    "send_at": "2026-11-27T17:00:00Z",
                    "metadata": {},
                    "created_at": "2026-11-26T10:00:00Z",
                    "updated_at": "2026-11-26T10:00:00Z",
                },
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
    send_at: datetime | None = Field(
        default=None,
        description="When a `scheduled` message is to leave: your `send_at`, or the end of "
        "the recipient's quiet hours; null for a message sent at once.",
    )
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
