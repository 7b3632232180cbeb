"""Request and response bodies of the events API (/v1/events, endpoints, signing secrets)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictInt

from app.db.models import SigningSecret, WebhookEndpoint
from app.events.outbox import EventStatus, EventType, EventView

_EVENT_EXAMPLE: dict[str, Any] = {
    "id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "type": "message.delivered",
    "status": "delivered",
    "url": "https://shop.example.com/sms-events",
    "endpoint_id": "3f2b8c1d-5e6a-4b7c-8d9e-0a1b2c3d4e5f",
    "message_id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10",
    "attempts": 1,
    "next_attempt_at": None,
    "last_error": None,
    "delivered_at": "2026-11-26T10:00:03.2Z",
    "created_at": "2026-11-26T10:00:03Z",
    "payload": {
        "id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "type": "message.delivered",
        "timestamp": "2026-11-26T10:00:03Z",
        "data": {"id": "5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10", "status": "delivered"},
    },
}
_ATTEMPT_EXAMPLE: dict[str, Any] = {
    "number": 1,
    "url": "https://shop.example.com/sms-events",
    "address": "203.0.113.10",
    "status": "failed",
    "error_code": "http_status",
    "error": "HTTP 503",
    "response_status": 503,
    "response_body": "upstream unavailable",
    "latency_ms": 412,
    "created_at": "2026-11-26T10:00:03Z",
}
_ENDPOINT_EXAMPLE: dict[str, Any] = {
    "id": "3f2b8c1d-5e6a-4b7c-8d9e-0a1b2c3d4e5f",
    "url": "https://shop.example.com/sms-events",
    "client_id": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
    "sender_id": None,
    "is_default": True,
    "disabled_at": None,
    "disabled_reason": None,
    "created_at": "2026-11-26T09:00:00Z",
    "updated_at": "2026-11-26T09:00:00Z",
}
_SECRET_EXAMPLE: dict[str, Any] = {
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw1ZZqvBtrWCE=",
    "created_at": "2026-11-26T09:00:00Z",
    "expires_at": None,
}


class EventOut(BaseModel):
    """An event and where its delivery is."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    id: uuid.UUID = Field(description="The event id (`webhook-id`); receivers dedupe on it.")
    type: EventType
    status: EventStatus = Field(
        description="`pending` (due, or waiting for a retry), `delivered` (a 2xx answer), "
        "`failed` (given up; it can be redelivered)."
    )
    url: str = Field(description="Where it is sent.")
    endpoint_id: uuid.UUID
    message_id: uuid.UUID | None
    attempts: int
    next_attempt_at: datetime | None = Field(description="When it is tried next, if pending.")
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any] = Field(description="The JSON body sent (see the webhooks).")

    @classmethod
    def of(cls, view: EventView) -> EventOut:
        """The resource for an event."""
        event = view.event
        return cls(
            id=event.id,
            type=EventType(event.type),
            status=EventStatus(event.status),
            url=view.url,
            endpoint_id=event.endpoint_id,
            message_id=event.message_id,
            attempts=event.attempts,
            next_attempt_at=(
                event.next_attempt_at if event.status == EventStatus.PENDING.value else None
            ),
            last_error=event.last_error,
            delivered_at=event.delivered_at,
            created_at=event.created_at,
            payload=event.payload,
        )


class EventPage(BaseModel):
    """A page of events, newest first. Pass `next_cursor` as `cursor` for the next page."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [_EVENT_EXAMPLE],
                    "has_more": False,
                    "next_cursor": None,
                }
            ]
        }
    )

    data: list[EventOut]
    has_more: bool
    next_cursor: str | None


class AttemptOut(BaseModel):
    """One delivery attempt."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_ATTEMPT_EXAMPLE]}
    )

    number: int = Field(description="1 for the first attempt.")
    url: str
    address: str | None = Field(description="The checked address connected to.")
    status: str = Field(description="`succeeded` or `failed`.")
    error_code: str | None = Field(
        description="`timeout`, `connection_error`, `dns_error`, `http_status`, `redirect`, "
        "`gone` or `destination_refused`."
    )
    error: str | None
    response_status: int | None
    response_body: str | None = Field(description="The start of the response body.")
    latency_ms: int
    created_at: datetime


class AttemptList(BaseModel):
    """An event's attempts, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_ATTEMPT_EXAMPLE]}]})

    data: list[AttemptOut]


class EndpointIn(BaseModel):
    """Where events are to be sent."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://shop.example.com/sms-events"}]},
    )

    url: AnyHttpUrl = Field(
        description="An https URL on the public internet (checked now and before each attempt)."
    )


class EndpointOut(BaseModel):
    """An endpoint events are sent to."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_ENDPOINT_EXAMPLE]}
    )

    id: uuid.UUID
    url: str
    client_id: uuid.UUID | None = Field(description="The client it belongs to (or None).")
    sender_id: uuid.UUID | None = Field(description="The sender it belongs to (or None).")
    is_default: bool = Field(description="Its owner's default endpoint.")
    disabled_at: datetime | None = Field(description="Set when its receiver answered 410.")
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> EndpointOut:
        """The resource for an endpoint row."""
        return cls.model_validate(endpoint)


class EndpointList(BaseModel):
    """A page of endpoints, oldest first. Pass `next_cursor` as `cursor` for the next page."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": [_ENDPOINT_EXAMPLE], "has_more": False, "next_cursor": None}]
        }
    )

    data: list[EndpointOut]
    has_more: bool
    next_cursor: str | None


class SecretOut(BaseModel):
    """A signing secret: `whsec_` + base64; the HMAC key is the decoded bytes."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_SECRET_EXAMPLE]}
    )

    secret: str
    created_at: datetime
    expires_at: datetime | None = Field(description="None for the current secret.")


class SecretList(BaseModel):
    """The secrets that sign events now, newest first: every one signs each attempt."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {**_SECRET_EXAMPLE, "created_at": "2026-11-27T09:00:00Z"},
                        {
                            "secret": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                            "created_at": "2026-11-26T09:00:00Z",
                            "expires_at": "2026-11-28T09:00:00Z",
                        },
                    ]
                }
            ]
        }
    )

    data: list[SecretOut]

    @classmethod
    def of(cls, secrets: list[SigningSecret]) -> SecretList:
        """The resource for secret rows."""
        return cls(data=[SecretOut.model_validate(secret) for secret in secrets])


class RotateIn(BaseModel):
    """How to rotate."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"grace_period_seconds": 86400}]}
    )

    grace_period_seconds: StrictInt | None = Field(
        default=None,
        ge=0,
        le=30 * 86400,
        description="How long the current secrets keep signing (EVENTS__SECRET_GRACE_SECONDS "
        "when omitted); 0 revokes them at once, after a leak.",
    )
