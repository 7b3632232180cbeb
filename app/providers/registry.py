"""The providers, as data: one `ProviderEntry` each, and the adapters built from them.

A provider is an adapter module (its `Provider` subclass and its settings model) plus one entry
here. Everything else reads this registry: the names a sender may use (`ProviderName`, checked
by the API and the senders' domain code, listed in the OpenAPI document), the webhook routes
(`/v1/webhooks/{provider}/status` and `/inbound`, with the methods each entry accepts), the
settings (`NAME__FIELD` variables, read through `Settings.section`) and `build_providers`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

import aiohttp
import httpx
import httpx_aiohttp
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from app.kernel.settings import Settings
from app.providers.base import Provider
from app.providers.fake import FakeLedger, FakeProvider, FakeProviderSettings, ReportScheduler
from app.providers.twilio import TwilioProvider, TwilioSettings
from app.providers.vonage import VonageProvider, VonageSettings

S = TypeVar("S", bound=BaseModel)

# The database's provider columns are String(20) (app.db.models).
MAX_NAME_LENGTH = 20


@dataclass(frozen=True, slots=True)
class WebhookReply:
    """What a provider's webhook call is answered with once recorded (what the provider wants
    back: Twilio reads TwiML, Vonage any 2xx)."""

    status_code: int = 204
    media_type: str | None = None
    body: str = ""


@dataclass(frozen=True, slots=True)
class Webhooks:
    """The HTTP methods a provider calls its status and inbound webhooks with (none: it has no
    such webhook, and the URL is 404), and the answer to an inbound call."""

    status: tuple[str, ...] = ("POST",)
    inbound: tuple[str, ...] = ("POST",)
    inbound_reply: WebhookReply = WebhookReply()


NO_WEBHOOKS = Webhooks(status=(), inbound=())


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What a process offers every adapter it builds."""

    settings: Settings
    http: httpx.AsyncClient
    # The fake provider's: how its delivery reports are scheduled, where it remembers its ids.
    schedule_fake_report: ReportScheduler | None = None
    fake_ledger: FakeLedger | None = None


@dataclass(frozen=True, slots=True)
class ProviderEntry(Generic[S]):
    """One provider: its name (in senders, URLs and metrics), its settings model (variables
    `NAME__FIELD`), how to build its adapter (None while it is not configured: messages to it
    then fail as `provider_not_configured`, its webhooks answer 403), and its webhooks."""

    name: str
    settings: type[S]
    build: Callable[[S, ProviderContext], Provider | None]
    webhooks: Webhooks = NO_WEBHOOKS


@dataclass(slots=True)
class ProviderRegistry:
    """The registered providers, by name. Tests register providers of their own."""

    _entries: dict[str, ProviderEntry[Any]] = field(default_factory=dict)

    def register(self, entry: ProviderEntry[Any]) -> None:
        """Add a provider; its name must be new, lower-case letters, digits or `_`."""
        if entry.name in self._entries:
            raise ValueError(f"a provider named {entry.name!r} is registered")
        if not entry.name.isidentifier() or entry.name != entry.name.lower():
            raise ValueError(f"{entry.name!r}: a provider name is a lower-case identifier")
        if len(entry.name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{entry.name!r}: a provider name has {MAX_NAME_LENGTH} characters at most"
            )
        self._entries[entry.name] = entry

    def unregister(self, name: str) -> None:
        """Remove a provider (tests that registered one)."""
        del self._entries[name]

    def get(self, name: str) -> ProviderEntry[Any] | None:
        """The provider named `name`, if registered."""
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def with_webhooks(self) -> list[str]:
        """The names of the providers that take webhooks over HTTP, sorted."""
        return [
            name
            for name, entry in sorted(self._entries.items())
            if entry.webhooks.status or entry.webhooks.inbound
        ]

    def __iter__(self) -> Iterator[ProviderEntry[Any]]:
        return iter(list(self._entries.values()))


PROVIDERS = ProviderRegistry()


class _Registered:
    """A `str` that must name a registered provider (checked when validated, so a provider
    registered later is accepted); its JSON schema lists the names registered when the
    OpenAPI document is built."""

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_registered, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["enum"] = PROVIDERS.names()
        return json_schema


def _registered(name: str) -> str:
    if PROVIDERS.get(name) is None:
        raise ValueError(f"unknown provider {name!r}; one of: {', '.join(PROVIDERS.names())}")
    return name


# A provider field of a request body: 422 naming the field for an unregistered name.
ProviderName = Annotated[str, _Registered()]


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    """httpx's API over aiohttp's connection pool (`httpx-aiohttp`), its failures named as
    httpx's own transport names them.

    Measured against the fake provider (`python -m bench.transports`), aiohttp's pool costs a
    fraction of httpcore's CPU per request. The package's own mapping calls any dropped
    connection a `ConnectTimeout`, which the adapters would retry as "not sent"; here only a
    failure to connect is one, and anything after (a reset, a disconnect, a read timeout) stays
    an unknown outcome.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send through aiohttp; the body's stream reclassifies its failures too."""
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _reclassified(exc) from exc.__cause__
        except aiohttp.ClientError as exc:
            # Not mapped by the package (a bad status line, oversized headers): the request had
            # gone out, so its outcome is unknown, as httpcore's protocol errors were.
            raise httpx.RemoteProtocolError(str(exc)) from exc
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Reclassified(response.stream)
        return response


def _reclassified(exc: httpx.TransportError) -> httpx.TransportError:
    """The httpx error httpcore would have raised for the aiohttp failure behind `exc`."""
    cause, message = exc.__cause__, str(exc)
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)  # no connection yet: nothing was sent
    if isinstance(cause, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    if isinstance(cause, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return httpx.ReadError(message)
    return exc  # raised before sending (an invalid URL): already named as httpx names it


class _Reclassified(httpx.AsyncByteStream):
    """A response body whose read failures are named as `AiohttpTransport` names them."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.TransportError as exc:
            raise _reclassified(exc) from exc.__cause__
        except aiohttp.ClientError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The shared client for provider calls: short connect timeout, bounded read timeout."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            settings.provider_read_timeout_seconds,
            connect=settings.provider_connect_timeout_seconds,
            # Waiting for a pooled connection happens before sending: keep it as short as a
            # connect, so the whole call stays within `provider_call_budget_seconds`.
            pool=settings.provider_connect_timeout_seconds,
        ),
        # Every connection may stay open: a worker keeps up to `worker_concurrency` calls in
        # flight, and closing the extra ones after each call would mean a new TCP and TLS
        # handshake each.
        transport=AiohttpTransport(
            limits=httpx.Limits(
                max_connections=settings.worker_concurrency,
                max_keepalive_connections=settings.worker_concurrency,
            )
        ),
        follow_redirects=False,
    )


def read_provider_settings(settings: Settings) -> None:
    """Read every registered provider's settings now, so a bad value (`VONAGE__SIGNATURE_METHOD=
    crc32`) stops a process at its start, as a bad value of any other group does."""
    for entry in PROVIDERS:
        settings.section(entry.name, entry.settings)


def build_providers(
    settings: Settings,
    http: httpx.AsyncClient,
    schedule_fake_report: ReportScheduler | None = None,
    fake_ledger: FakeLedger | None = None,
) -> dict[str, Provider]:
    """Adapters by name: every registered provider that is configured (Twilio and Vonage once
    their credentials are set; the fake always)."""
    context = ProviderContext(settings, http, schedule_fake_report, fake_ledger)
    providers: dict[str, Provider] = {}
    for entry in PROVIDERS:
        adapter = entry.build(settings.section(entry.name, entry.settings), context)
        if adapter is not None:
            providers[entry.name] = adapter
    return providers


def _fake(settings: FakeProviderSettings, context: ProviderContext) -> Provider:
    return FakeProvider(
        settings, schedule_report=context.schedule_fake_report, ledger=context.fake_ledger
    )


def _twilio(settings: TwilioSettings, context: ProviderContext) -> Provider | None:
    if not settings.account_sid:
        return None
    return TwilioProvider(settings, context.http, context.settings.public_base_url)


def _vonage(settings: VonageSettings, context: ProviderContext) -> Provider | None:
    if not settings.api_key:
        return None
    return VonageProvider(settings, context.http, context.settings.public_base_url)


# Twilio reads the inbound webhook's answer as TwiML; an empty <Response> sends nothing back by
# itself, since replies go through our own outbound path (each with an id and a status).
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

# The fake takes no HTTP webhooks: its reports come from our own queue.
PROVIDERS.register(ProviderEntry("fake", FakeProviderSettings, _fake))
PROVIDERS.register(
    ProviderEntry(
        "twilio",
        TwilioSettings,
        _twilio,
        Webhooks(inbound_reply=WebhookReply(200, "text/xml", EMPTY_TWIML)),
    )
)
# Vonage calls with GET or POST (form or JSON), as its dashboard is set.
PROVIDERS.register(
    ProviderEntry("vonage", VonageSettings, _vonage, Webhooks(("GET", "POST"), ("GET", "POST")))
)
