"""Request and response bodies of `/v1/clients/{client}/traffic`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

CountryCode = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z]{2}$", to_upper=True),
    Field(examples=["FR"]),
]

_LIMIT = Field(default=None, ge=0, le=100_000_000)


class TrafficRulesIn(BaseModel):
    """A client's rules, replacing what was set: a field left out or null is the service's
    default (TRAFFIC__*); a limit of 0 is unlimited."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "permitted_countries": ["FR"],
                    "messages_per_minute": 100,
                    "segments_per_minute": 300,
                    "messages_per_day": 10000,
                    "segments_per_day": 30000,
                }
            ]
        },
    )

    permitted_countries: list[CountryCode] | None = Field(
        default=None,
        max_length=300,
        description="Destination countries (ISO 3166 alpha-2), within the service's list; "
        "null: the service's list.",
    )
    messages_per_minute: int | None = _LIMIT
    segments_per_minute: int | None = _LIMIT
    messages_per_day: int | None = _LIMIT
    segments_per_day: int | None = _LIMIT


class Limits(BaseModel):
    """Limits in force (0: unlimited)."""

    messages_per_minute: int = Field(examples=[100])
    segments_per_minute: int = Field(examples=[300])
    messages_per_day: int = Field(examples=[10000])
    segments_per_day: int = Field(examples=[30000])


class TrafficRulesOut(TrafficRulesIn):
    """A client's rules as set (null: the default), and what is in force from them."""

    model_config = ConfigDict(extra="forbid")

    client: str = Field(examples=["shop"])
    effective_countries: list[str] = Field(
        examples=[["FR"]], description="The countries the client may send to now."
    )
    effective_limits: Limits
