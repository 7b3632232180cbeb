"""Builds the adapters this process can use, from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import httpx

from app.providers.base import Provider
from app.providers.fake import FakeLedger, FakeProvider, ReportScheduler
from app.providers.twilio import TwilioProvider
from app.providers.vonage import VonageProvider
from app.settings import Settings

# Connections per pool of `PooledTransport`.
CONNECTIONS_PER_POOL: Final = 10


class PooledTransport(httpx.AsyncBaseTransport):
    """Several small connection pools instead of one large one, each request to the least busy.

    httpcore looks at every connection of its pool on each request (for a free one, and for
    expired ones, with a system call each), so with a hundred calls in flight one pool spends
    more time looking than sending; in pools of ten it does not.
    """

    def __init__(self, connections: int, **options: Any) -> None:
        count = max(1, -(-connections // CONNECTIONS_PER_POOL))
        size = -(-connections // count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits, **options) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send on the pool with the fewest requests in flight."""
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        # The connection stays busy until the body is read and the response closed.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self._busy[index] -= 1

    async def aclose(self) -> None:
        """Close every pool."""
        for pool in self._pools:
            await pool.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that calls `on_close` once, when closed."""

    def __init__(self, stream: httpx.AsyncByteStream, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Callable[[], None] | None = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


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
        transport=PooledTransport(settings.worker_concurrency),
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
