"""Builds the adapters this process can use, from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import httpx_aiohttp

from app.kernel.settings import Settings
from app.providers.base import Provider
from app.providers.fake import FakeLedger, FakeProvider, ReportScheduler
from app.providers.twilio import TwilioProvider
from app.providers.vonage import VonageProvider


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


def build_providers(
    settings: Settings,
    http: httpx.AsyncClient,
    schedule_fake_report: ReportScheduler | None = None,
    fake_ledger: FakeLedger | None = None,
) -> dict[str, Provider]:
    """Adapters by name. Twilio and Vonage are present once their credentials are set."""
    providers: dict[str, Provider] = {
        "fake": FakeProvider(
            settings.fake, schedule_report=schedule_fake_report, ledger=fake_ledger
        )
    }
    if settings.twilio.account_sid:
        providers["twilio"] = TwilioProvider(settings.twilio, http, settings.public_base_url)
    if settings.vonage.api_key:
        providers["vonage"] = VonageProvider(settings.vonage, http, settings.public_base_url)
    return providers
