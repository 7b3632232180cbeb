"""Request and response bodies of senders: their addresses, providers, keywords and grants."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StringConstraints,
)

from app.db.models import Sender
from app.kernel.text import StorableStr
from app.providers.registry import ProviderName
from app.senders.keywords import KeywordConfig, missing_replies
from app.senders.service import SenderKind, served_countries

_COUNTRIES_DOC = (
    "The destination countries (ISO 3166-1 alpha-2) this sender serves when a sender is picked "
    'from a client\'s pool (a send without `from`, README "Sender pools"). Omitted or null: '
    "its kind's default, the country of its number for a long code (a toll-free number too), "
    "none for a short code or an alphanumeric ID; `[]`: none. It does not restrict a send that "
    "names the sender in `from`."
)


CountryCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2}$")]
"""An ISO 3166-1 alpha-2 country code (checked against the phone plans by the service)."""


def _countries_field(examples: list[Any]) -> Any:
    return Field(default=None, max_length=300, description=_COUNTRIES_DOC, examples=examples)


_SENDER_EXAMPLE: dict[str, Any] = {
    "id": "0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b",
    "address": "+14155550100",
    "kind": "long_code",
    "provider": "twilio",
    "fallback_provider": None,
    "rate_per_second": 1.0,
    "description": "US order notifications",
    "countries": ["CA", "US"],
    "served_countries": ["CA", "US"],
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


class SenderIn(BaseModel):
    """A new sender."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"address": "+14155550100", "kind": "long_code", "provider": "twilio"},
                {
                    "address": "+18445550100",
                    "kind": "long_code",
                    "provider": "twilio",
                    "description": "toll-free, US and Canada",
                    "countries": ["US", "CA"],
                },
                {
                    "address": "ACME",
                    "kind": "alphanumeric",
                    "provider": "vonage",
                    "countries": ["FR"],
                },
            ]
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
    countries: list[CountryCode] | None = _countries_field([["US", "CA"]])
    keywords: KeywordConfig = Field(
        default_factory=KeywordConfig,
        description="Keyword sets and replies; the built-in sets (English and French) when "
        "omitted. The sender cannot send until its opt-out and help replies are configured.",
    )


class SenderPatch(BaseModel):
    """Changes to a sender; omitted fields stay as they are."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"provider": "vonage"}, {"countries": ["FR", "BE"]}]},
    )

    provider: ProviderName | None = None
    fallback_provider: ProviderName | None = Field(
        default=None, description="A fallback provider; `null` removes it, omitted keeps it."
    )
    rate_per_second: StrictFloat | None = Field(
        default=None, gt=0, le=10_000, description="Messages per second, across all workers."
    )
    description: StorableStr | None = Field(default=None, max_length=200)
    countries: list[CountryCode] | None = Field(
        default=None,
        max_length=300,
        description="Replaces the countries it serves from a pool; `null`: back to its kind's "
        "default, omitted: unchanged.",
        examples=[["FR", "BE"]],
    )
    keywords: KeywordConfig | None = Field(
        default=None, description="Replaces the sender's whole keyword configuration."
    )


class SenderOut(BaseModel):
    """A sender."""

    model_config = ConfigDict(json_schema_extra={"examples": [_SENDER_EXAMPLE]})

    id: uuid.UUID
    address: str
    kind: SenderKind
    provider: str = Field(description="A registered provider's name.", examples=["twilio"])
    fallback_provider: str | None = Field(
        description="Where messages go while the provider's circuit breaker is open."
    )
    rate_per_second: float = Field(description="Messages per second, across all workers.")
    description: str | None
    countries: list[str] | None = Field(
        description="The countries set for pool selection; null: its kind's default."
    )
    served_countries: list[str] = Field(
        description="The countries it serves when picked from a pool (`countries`, or its "
        "kind's default), sorted.",
        examples=[["CA", "US"]],
    )
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
            provider=sender.provider,
            fallback_provider=sender.fallback_provider,
            rate_per_second=sender.rate_per_second,
            description=sender.description,
            countries=sender.countries,
            served_countries=sorted(
                served_countries(sender.kind, sender.address, sender.countries)
            ),
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
