"""Request and response bodies of /v1/api-keys (admin keys only)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)

from app.access.api_keys import KeyView
from app.kernel.text import StorableStr


def _storable_instant(value: datetime) -> datetime:
    """An instant PostgreSQL can store: in UTC, within its year 1-9999 (an offset can push
    9999-12-31 past it, which the driver cannot even encode)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            "out of range: the instant must fall within the years 1 to 9999 UTC"
        ) from None


StorableDatetime = Annotated[AwareDatetime, AfterValidator(_storable_instant)]

_KEY_EXAMPLE: dict[str, Any] = {
    "id": "9d4c2a1e-6f0b-4e8a-b3c5-7d1e2f3a4b5c",
    "client": "billing",
    "name": "billing backend",
    "prefix": "sk_Q2xV8pL",
    "admin": False,
    "status": "active",
    "created_at": "2026-11-26T09:00:00Z",
    "last_used_at": "2026-11-26T10:00:00Z",
    "expires_at": None,
    "revoked_at": None,
}


class ApiKeyOut(BaseModel):
    """An API key, without its secret (shown once, when it is made)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_KEY_EXAMPLE]})

    id: uuid.UUID
    client: str = Field(description="The client it acts for.")
    name: str | None = Field(description="What it is for.")
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    admin: bool = Field(description="May manage the service (senders, keys, opt-ins).")
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="When it was last used, to within about a minute (and the API processes' "
        "key cache, LOOKUP_CACHE_SECONDS); null if never since it was made."
    )
    expires_at: datetime | None = Field(description="It stops working then; null: never.")
    revoked_at: datetime | None

    @classmethod
    def of(cls, view: KeyView) -> ApiKeyOut:
        """The resource for a key."""
        key = view.key
        return cls(
            id=key.id,
            client=view.client_name,
            name=key.name,
            prefix=key.prefix,
            admin=key.is_admin,
            status=view.status,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
        )


class ApiKeyList(BaseModel):
    """API keys, oldest first, revoked and expired ones included."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_KEY_EXAMPLE]}]})

    data: list[ApiKeyOut]


class ApiKeyIn(BaseModel):
    """A new key."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"client": "billing", "name": "billing backend", "admin": False}]
        },
    )

    client: StorableStr = Field(
        min_length=1, max_length=200, description="The client's name (created if new)."
    )
    name: StorableStr | None = Field(default=None, max_length=200, description="What it is for.")
    admin: StrictBool = Field(default=False, description="May manage the service.")
    expires_at: StorableDatetime | None = Field(
        default=None, description="It stops working then (in the future, with a UTC offset)."
    )


class RotateKeyIn(BaseModel):
    """How to rotate a key."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"overlap_seconds": 86400}]}
    )

    overlap_seconds: StrictInt = Field(
        default=86400,
        ge=0,
        le=30 * 86400,
        description="How long the old key keeps working (0: it stops now).",
    )
    expires_at: StorableDatetime | None = Field(
        default=None, description="When the new key stops working; null: never."
    )


class ApiKeyCreated(BaseModel):
    """A key just made: its secret, shown this once and never again."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"key": "sk_Q2xV8pLkT3…", "api_key": _KEY_EXAMPLE, "previous": None},
            ]
        }
    )

    key: str = Field(description="The secret: `Authorization: Bearer <key>`. Not shown again.")
    api_key: ApiKeyOut
    previous: ApiKeyOut | None = Field(
        default=None, description="A rotation: the old key, with the end of its overlap."
    )
