"""Response bodies of inbound messages: what customers sent to our addresses."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

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
