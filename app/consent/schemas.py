"""Request and response bodies of consent: opt-outs, their history and imports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

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
