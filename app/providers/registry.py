"""Builds the adapters this process can use, from settings."""

from __future__ import annotations

import httpx

from app.providers.base import Provider
from app.providers.fake import FakeLedger, FakeProvider, ReportScheduler
from app.providers.twilio import TwilioProvider
from app.providers.vonage import VonageProvider
from app.settings import Settings


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
        limits=httpx.Limits(
            max_connections=settings.worker_concurrency,
            max_keepalive_connections=settings.worker_concurrency,
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
