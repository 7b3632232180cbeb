"""Request and response bodies of the held-message endpoints."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.kernel.text import StorableStr

_CLIENT_EXAMPLE = "3f2c1b0a-9e8d-4c7b-a6f5-e4d3c2b1a090"


class HeldSelection(BaseModel):
    """Whose held messages."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"client": "shop"}]})

    client: StorableStr = Field(
        min_length=1, max_length=200, description="The client's name.", examples=["shop"]
    )


class HeldSettled(BaseModel):
    """What a bulk release or cancel did."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"client": "shop", "released": 212, "canceled": 0}]}
    )

    client: str = Field(description="The client's name.", examples=["shop"])
    released: int = Field(
        default=0,
        description="Messages released: `queued` (sent as usual), or `scheduled` while "
        "their `send_at` is ahead.",
        examples=[212],
    )
    canceled: int = Field(
        default=0, description="Messages moved to `canceled` (never sent).", examples=[0]
    )


class PumpingOverride(BaseModel):
    """A client's own pumping alarm settings; a field left null takes the service's."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"action": "hold", "min_distinct": 200, "baseline_multiple": None}]
        },
    )

    action: Literal["off", "alert", "hold"] | None = Field(
        default=None,
        description='`off`, `alert` or `hold` (README, "SMS pumping defence").',
        examples=["hold"],
    )
    min_distinct: int | None = Field(
        default=None,
        ge=2,
        le=1_000_000,
        description="Never fire below this many distinct numbers of one range in the window.",
        examples=[200],
    )
    baseline_multiple: float | None = Field(
        default=None,
        ge=1.0,
        le=1000.0,
        description="Fire above this multiple of the client's usual count in the range.",
        examples=[10.0],
    )


class PumpingEffective(BaseModel):
    """The settings the alarm judges the client's traffic with."""

    action: str = Field(examples=["hold"])
    window_seconds: int = Field(examples=[60])
    range_digits: int = Field(examples=[4])
    min_distinct: int = Field(examples=[200])
    baseline_multiple: float = Field(examples=[5.0])
    baseline_half_life_hours: float = Field(examples=[24.0])


class ClientPumping(BaseModel):
    """A client's pumping alarm settings: its own (null: none), and those in effect."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "client_id": _CLIENT_EXAMPLE,
                    "own": {"action": "hold", "min_distinct": 200, "baseline_multiple": None},
                    "effective": {
                        "action": "hold",
                        "window_seconds": 60,
                        "range_digits": 4,
                        "min_distinct": 200,
                        "baseline_multiple": 5.0,
                        "baseline_half_life_hours": 24.0,
                    },
                }
            ]
        }
    )

    client_id: uuid.UUID = Field(description="The client's id.", examples=[_CLIENT_EXAMPLE])
    own: PumpingOverride | None = Field(description="Set by an admin; null: the service's.")
    effective: PumpingEffective
