"""Request and response bodies of the held-message endpoints."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

_CLIENT_EXAMPLE = "3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090"


class HeldSelection(BaseModel):
    """Whose held messages."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"client_id": _CLIENT_EXAMPLE}]}
    )

    client_id: uuid.UUID = Field(description="The client's id.", examples=[_CLIENT_EXAMPLE])


class HeldSettled(BaseModel):
    """What a bulk release or cancel did."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"client_id": _CLIENT_EXAMPLE, "released": 212, "canceled": 0}]
        }
    )

    client_id: uuid.UUID = Field(description="The client's id.", examples=[_CLIENT_EXAMPLE])
    released: int = Field(
        default=0, description="Messages moved to `queued` (sent as usual).", examples=[212]
    )
    canceled: int = Field(
        default=0, description="Messages moved to `canceled` (never sent).", examples=[0]
    )
