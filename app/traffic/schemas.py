"""Request and response bodies of the held-message endpoints."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field


class HeldSelection(BaseModel):
    """Whose held messages."""

    client_id: uuid.UUID = Field(examples=["3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090"])


class HeldSettled(BaseModel):
    """What a bulk release or cancel did."""

    client_id: uuid.UUID = Field(examples=["3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090"])
    released: int = Field(
        default=0, description="Messages moved to `queued` (sent as usual).", examples=[212]
    )
    canceled: int = Field(
        default=0, description="Messages moved to `canceled` (never sent).", examples=[0]
    )
