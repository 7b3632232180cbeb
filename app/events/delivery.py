"""Delivering one event: claim it, POST it signed to its endpoint, record the attempt.

Like message delivery, in three steps and without a database connection held during the HTTP
call: a short transaction claims the event (a lease in `in_flight_until`, so a duplicate job does
nothing), the attempt runs, a second short transaction records it and decides what is next.

* **At least once.** An event stays `pending` until an answer settles it; a worker that dies
  mid-attempt leaves a lease that runs out, and the sweep enqueues the event again. Receivers
  dedupe on the event id.
* **In order.** An event waits while an earlier event with the same ordering key (the same
  message, say) is pending for the same endpoint; when that one is delivered or given up, the
  next is enqueued (`EventOutcome.jobs`).
* **Answers.** 2xx delivers. 410 Gone disables the endpoint and fails the event. Timeouts,
  connection errors, 408, 429 and 5xx are retried with exponential backoff and jitter (never
  sooner than a `Retry-After`) until `EVENTS__RETRY_WINDOW_SECONDS` after the first attempt.
  Any other answer (3xx, other 4xx) fails the event at once: the receiver answered deliberately,
  the same bytes will get the same answer for a day, and later events of the same message would
  wait behind it. The client sees the attempt and can redeliver once the receiver is fixed.
* **Bounded.** Redirects are not followed; at most `EVENTS__MAX_RESPONSE_BYTES` of a response is
  read (raw, never decompressed); the whole attempt, DNS to last byte, is cut at
  `EVENTS__TIMEOUT_SECONDS` (a status line received before that still counts).
* **Isolated.** At most `EVENTS__MAX_IN_FLIGHT_PER_ENDPOINT` attempts run against one endpoint at
  once (counted in PostgreSQL, so across every events worker); an event over the limit is put off
  for a while. A dead endpoint so holds a few of a worker's slots, never all of them, and events
  run on their own queue and worker, never in the way of SMS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, cast
from urllib.parse import urlencode

import httpx
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.db.models import TwilioCredential, WebhookAttempt, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from app.events.destinations import DestinationRefused, Resolver, resolve_destination
from app.events.destinations import system_resolver as _system_resolver
from app.events.endpoints import Owner, disable
from app.events.outbox import EventJob, EventStatus
from app.events.signing import active_secrets, webhook_headers
from app.kernel.metrics import EVENT_DELIVERY_ATTEMPTS, EVENT_DELIVERY_SECONDS
from app.kernel.settings import EventsSettings
from app.kernel.text import storable
from app.providers.base import retry_after_seconds
from app.twilio_api.vocabulary import signature

log = logging.getLogger(__name__)

USER_AGENT = "smsgate-webhooks/1"
# A job may start a little before the time it was deferred to: that is due.
NOT_DUE_TOLERANCE_SECONDS = 0.1
# The lease outlives the attempt by this much (the two short transactions around it).
LEASE_MARGIN_SECONDS = 30.0
SWEEP_BATCH = 1000


def attempt_budget_seconds(settings: EventsSettings) -> float:
    """The longest one delivery job can take: the attempt plus its transactions."""
    return settings.timeout_seconds + LEASE_MARGIN_SECONDS


@dataclass(frozen=True, slots=True)
class EventRetryPolicy:
    """Exponential backoff with jitter, within a window measured from the first attempt."""

    base_delay: float
    max_delay: float
    window: timedelta

    @classmethod
    def of(cls, settings: EventsSettings) -> EventRetryPolicy:
        """The policy the settings describe."""
        return cls(
            base_delay=settings.retry_base_delay_seconds,
            max_delay=settings.retry_max_delay_seconds,
            window=timedelta(seconds=settings.retry_window_seconds),
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first): between half
        and all of `base * 2**(attempt-1)`, capped at `max_delay`; at least `retry_after`."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 60))
        delay = random.uniform(ceiling / 2, ceiling)
        return min(max(delay, retry_after or 0.0), self.max_delay)


class AttemptKind(StrEnum):
    """What an attempt's outcome means for its event."""

    DELIVERED = "delivered"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"
    GONE = "gone"


def classify_status(status: int) -> AttemptKind:
    """The receiver's answer, as the Standard Webhooks spec suggests reading it."""
    if 200 <= status < 300:
        return AttemptKind.DELIVERED
    if status == 410:
        return AttemptKind.GONE
    if status in (408, 429) or status >= 500:
        return AttemptKind.RETRYABLE
    return AttemptKind.PERMANENT  # 1xx oddities, 3xx (not followed), other 4xx


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One HTTP attempt, as recorded."""

    kind: AttemptKind
    latency_ms: int
    error_code: str | None = None
    error: str | None = None
    response_status: int | None = None
    response_body: str | None = None
    address: str | None = None
    retry_after: float | None = None

    def summary(self) -> str:
        """One line for `last_error`."""
        if self.error:
            return self.error
        return f"HTTP {self.response_status}"


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What one delivery run did: the event's status after it, whether to run again later,
    and deliveries to enqueue (the next event in line)."""

    status: EventStatus | None
    retry_in: float | None = None
    jobs: tuple[EventJob, ...] = ()


@dataclass(frozen=True, slots=True)
class _Claim:
    event_id: uuid.UUID
    endpoint_id: uuid.UUID
    number: int
    url: str
    payload: dict[str, Any]
    keys: tuple[str, ...]
    # A Twilio status callback (`format` twilio) is signed with its client's auth token.
    twilio_token: str | None = None


def build_events_http_client(settings: EventsSettings) -> httpx.AsyncClient:
    """The client for event attempts: its own pool, apart from the providers'.

    No redirects. No proxy from the environment (it would connect to names we did not check).
    No keep-alive: attempts connect to a checked address with the endpoint's name for TLS, and a
    pooled connection to that address could be reused for another name served there. No cookies:
    one receiver's must never reach another.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=0),
        cookies=httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))),
        headers={"user-agent": USER_AGENT},
    )


async def deliver_event(
    event_id: uuid.UUID,
    session_factory: SessionFactory,
    http: httpx.AsyncClient,
    settings: EventsSettings,
    resolver: Resolver = _system_resolver,
) -> EventOutcome:
    """Make one delivery attempt of a pending event, if it is due and its turn."""
    claimed = await _claim(session_factory, event_id, settings)
    if isinstance(claimed, EventOutcome):
        return claimed
    if claimed.twilio_token is not None:
        # As Twilio posts a status callback: form-encoded, signed over the URL and the fields.
        fields = {name: str(value) for name, value in claimed.payload.items()}
        body = urlencode(fields).encode()
        headers = {
            "x-twilio-signature": signature(claimed.twilio_token, claimed.url, fields),
            "content-type": "application/x-www-form-urlencoded",
        }
    else:
        body = json.dumps(claimed.payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = webhook_headers(claimed.keys, str(claimed.event_id), int(time.time()), body)
    try:
        result = await post_event(http, claimed.url, body, headers, settings, resolver)
    except Exception as error:  # a bug, or a receiver's answer we failed to read: recorded
        log.exception("event attempt failed unexpectedly", extra={"event_id": str(event_id)})
        result = AttemptResult(
            kind=AttemptKind.RETRYABLE,
            latency_ms=0,
            error_code="internal_error",
            error=repr(error)[:500],
        )
    EVENT_DELIVERY_ATTEMPTS.labels(outcome=result.kind.value).inc()
    EVENT_DELIVERY_SECONDS.observe(result.latency_ms / 1000)
    log.info(
        "event attempt",
        extra={
            "event_id": str(event_id),
            "attempt": claimed.number,
            "outcome": result.kind.value,
            "status_code": result.response_status,
            "latency_ms": result.latency_ms,
        },
    )
    return await _record(session_factory, claimed, result, EventRetryPolicy.of(settings))


async def _claim(
    session_factory: SessionFactory, event_id: uuid.UUID, settings: EventsSettings
) -> _Claim | EventOutcome:
    """Take the lease on a pending event, or say why not now."""
    async with session_factory.begin() as session:
        event = await session.scalar(
            select(WebhookEvent).where(WebhookEvent.id == event_id).with_for_update()
        )
        if event is None or event.status != EventStatus.PENDING.value:
            return EventOutcome(None)
        now = datetime.now(UTC)
        wait = (event.next_attempt_at - now).total_seconds()
        if wait > NOT_DUE_TOLERANCE_SECONDS:
            return EventOutcome(EventStatus.PENDING, retry_in=wait)  # early: keep the backoff
        if event.in_flight_until is not None and event.in_flight_until > now:
            return EventOutcome(EventStatus.PENDING)  # another run holds it and records it
        overdue = timedelta(seconds=2 * attempt_budget_seconds(settings))
        if event.retry_until is not None and now > event.retry_until + overdue:
            # Long past its window, so its last attempts were never recorded (a run that kept
            # crashing): give it up here, or it would be retried forever.
            event.status = EventStatus.FAILED.value
            event.last_error = "retry window over"
            return EventOutcome(EventStatus.FAILED, jobs=await _next_in_line(session, event))
        # Locking the endpoint serialises claims against it, so the in-flight count is exact.
        endpoint = await session.scalar(
            select(WebhookEndpoint).where(WebhookEndpoint.id == event.endpoint_id).with_for_update()
        )
        assert endpoint is not None  # a foreign key
        if endpoint.disabled_at is not None:
            event.status = EventStatus.FAILED.value
            event.last_error = f"endpoint disabled: {endpoint.disabled_reason}"
            return EventOutcome(EventStatus.FAILED, jobs=await _next_in_line(session, event))
        if await _waiting_for_earlier(session, event):
            # The earlier one enqueues this one when it is done (and the sweep if that is lost).
            return EventOutcome(EventStatus.PENDING)
        if await _over_limits(session, endpoint, now, settings):
            # Put off by about one attempt's length, when a slot is likely free again; moving
            # its due time keeps the sweep's oldest-due batch for events that can go now.
            pause = random.uniform(settings.timeout_seconds / 2, settings.timeout_seconds)
            event.next_attempt_at = now + timedelta(seconds=pause)
            return EventOutcome(EventStatus.PENDING, retry_in=pause)
        return await _lease(session, event, endpoint, now, settings)


async def _over_limits(
    session: AsyncSession, endpoint: WebhookEndpoint, now: datetime, settings: EventsSettings
) -> bool:
    """Whether the endpoint, or its owner's endpoints together, have as many attempts in flight
    as they may (the caller holds the endpoint's lock; this takes the owner's)."""
    in_flight = await session.scalar(
        select(func.count())
        .select_from(WebhookEvent)
        .where(WebhookEvent.endpoint_id == endpoint.id, WebhookEvent.in_flight_until > now)
    )
    same_owner = (
        WebhookEndpoint.client_id == endpoint.client_id
        if endpoint.client_id is not None
        else WebhookEndpoint.sender_id == endpoint.sender_id
    )
    # Claims against one owner's endpoints are serialised too, so its count is exact.
    owner_key = f"event-owner:{endpoint.client_id or endpoint.sender_id}"
    await session.execute(
        select(
            func.pg_advisory_xact_lock(
                int.from_bytes(hashlib.sha256(owner_key.encode()).digest()[:8], "big", signed=True)
            )
        )
    )
    owner_in_flight = await session.scalar(
        select(func.count())
        .select_from(WebhookEvent)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookEvent.endpoint_id)
        .where(same_owner, WebhookEvent.in_flight_until > now)
    )
    return (in_flight or 0) >= settings.max_in_flight_per_endpoint or (
        owner_in_flight or 0
    ) >= settings.max_in_flight_per_owner


async def _lease(
    session: AsyncSession,
    event: WebhookEvent,
    endpoint: WebhookEndpoint,
    now: datetime,
    settings: EventsSettings,
) -> _Claim | EventOutcome:
    """Count the attempt and lease the event for it, with what the attempt signs with."""
    event.attempts += 1
    event.in_flight_until = now + timedelta(seconds=attempt_budget_seconds(settings))
    if event.retry_until is None:
        event.retry_until = now + timedelta(seconds=settings.retry_window_seconds)
    if event.format == "twilio":
        token = await session.scalar(
            select(TwilioCredential.auth_token).where(
                TwilioCredential.client_id == endpoint.client_id
            )
        )
        if token is None:  # its credentials were withdrawn: nothing to sign with
            event.status = EventStatus.FAILED.value
            event.in_flight_until = None
            event.last_error = "the client has no Twilio credentials to sign the callback"
            return EventOutcome(EventStatus.FAILED, jobs=await _next_in_line(session, event))
        return _Claim(
            event_id=event.id,
            endpoint_id=endpoint.id,
            number=event.attempts,
            url=endpoint.url,
            payload=dict(event.payload),
            keys=(),
            twilio_token=token,
        )
    secrets = await active_secrets(session, Owner.of(endpoint))
    return _Claim(
        event_id=event.id,
        endpoint_id=endpoint.id,
        number=event.attempts,
        url=endpoint.url,
        payload=dict(event.payload),
        keys=tuple(secret.secret for secret in secrets),
    )


async def _waiting_for_earlier(session: AsyncSession, event: WebhookEvent) -> bool:
    if event.ordering_key is None:
        return False
    earlier = await session.scalar(
        select(WebhookEvent.seq)
        .where(
            WebhookEvent.endpoint_id == event.endpoint_id,
            WebhookEvent.ordering_key == event.ordering_key,
            WebhookEvent.seq < event.seq,
            WebhookEvent.status == EventStatus.PENDING.value,
        )
        .limit(1)
    )
    return earlier is not None


async def _next_in_line(session: AsyncSession, event: WebhookEvent) -> tuple[EventJob, ...]:
    """The next pending event of the same line, to enqueue now that this one is done."""
    if event.ordering_key is None:
        return ()
    successor = await session.scalar(
        select(WebhookEvent.id)
        .where(
            WebhookEvent.endpoint_id == event.endpoint_id,
            WebhookEvent.ordering_key == event.ordering_key,
            WebhookEvent.seq > event.seq,
            WebhookEvent.status == EventStatus.PENDING.value,
        )
        .order_by(WebhookEvent.seq)
        .limit(1)
    )
    # Its own job id: a job of the successor that is still finishing (it found this one pending)
    # must not absorb the wake-up.
    return (EventJob(successor, tag=f"after-{event.id}"),) if successor is not None else ()


async def _record(
    session_factory: SessionFactory,
    claim: _Claim,
    result: AttemptResult,
    policy: EventRetryPolicy,
) -> EventOutcome:
    """Store the attempt and move the event on: delivered, retried later, or given up."""
    now = datetime.now(UTC)
    async with session_factory.begin() as session:
        session.add(
            WebhookAttempt(
                event_id=claim.event_id,
                number=claim.number,
                url=claim.url,
                address=result.address,
                status="succeeded" if result.kind is AttemptKind.DELIVERED else "failed",
                error_code=result.error_code,
                error=result.error,
                response_status=result.response_status,
                response_body=result.response_body,
                latency_ms=result.latency_ms,
            )
        )
        event = await session.scalar(
            select(WebhookEvent).where(WebhookEvent.id == claim.event_id).with_for_update()
        )
        if event is None or event.status != EventStatus.PENDING.value:
            return EventOutcome(None)
        event.in_flight_until = None
        if result.kind is AttemptKind.DELIVERED:
            event.status = EventStatus.DELIVERED.value
            event.delivered_at = now
            event.last_error = None
        elif result.kind is AttemptKind.GONE:
            await disable(session, claim.endpoint_id, "the receiver answered 410 Gone")
            event.status = EventStatus.FAILED.value
            event.last_error = "the receiver answered 410 Gone: its endpoint is disabled"
        elif result.kind is AttemptKind.RETRYABLE:
            delay = policy.delay(event.attempts, result.retry_after)
            if now + timedelta(seconds=delay) <= (event.retry_until or now):
                event.next_attempt_at = now + timedelta(seconds=delay)
                event.last_error = result.summary()
                return EventOutcome(EventStatus.PENDING, retry_in=delay)
            event.status = EventStatus.FAILED.value
            event.last_error = f"gave up after {event.attempts} attempts: {result.summary()}"
        else:
            event.status = EventStatus.FAILED.value
            event.last_error = result.summary()
        jobs = await _next_in_line(session, event)
        return EventOutcome(EventStatus(event.status), jobs=jobs)


async def post_event(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    settings: EventsSettings,
    resolver: Resolver = _system_resolver,
) -> AttemptResult:
    """POST `body` to `url` once, after checking where `url` leads, and read a bounded answer."""
    started = time.monotonic()
    deadline = asyncio.get_running_loop().time() + settings.timeout_seconds

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    address: str | None = None
    try:
        async with asyncio.timeout_at(deadline):
            destination = await resolve_destination(url, settings, resolver)
            target, host_header, extensions = destination.pinned()
            address = str(destination.addresses[0])
            request = http.build_request(
                "POST",
                target,
                content=body,
                headers=_request_headers(headers, host_header),
                extensions=extensions,
            )
            response = await http.send(request, stream=True, follow_redirects=False)
    except DestinationRefused as refused:
        # A name that stopped resolving may be a receiver's brief DNS mistake: retried, like a
        # timeout. An address or URL we refuse stays refused.
        retry = refused.temporary or refused.unresolved
        return AttemptResult(
            AttemptKind.RETRYABLE if retry else AttemptKind.PERMANENT,
            elapsed(),
            error_code="dns_error" if retry else "destination_refused",
            error=f"destination refused: {refused.reason}",
        )
    except (TimeoutError, httpx.TimeoutException):
        return AttemptResult(
            AttemptKind.RETRYABLE,
            elapsed(),
            error_code="timeout",
            error=f"no answer within {settings.timeout_seconds:g} s",
            address=address,
        )
    except httpx.HTTPError as error:
        return AttemptResult(
            AttemptKind.RETRYABLE,
            elapsed(),
            error_code="connection_error",
            error=f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
            address=address,
        )
    try:
        excerpt = await _read_some(response, settings.max_response_bytes, deadline)
    finally:
        await response.aclose()
    return _answered(response, excerpt, elapsed(), address)


def _request_headers(headers: dict[str, str], host_header: dict[str, str]) -> dict[str, str]:
    """An attempt's headers: JSON unless the event's own say otherwise, the pinned Host, and
    the body as it is (never compressed: only a bounded excerpt is read)."""
    return {
        "content-type": "application/json",
        **headers,
        **host_header,
        "accept-encoding": "identity",
    }


def _answered(
    response: httpx.Response, excerpt: bytes, latency_ms: int, address: str | None
) -> AttemptResult:
    """The attempt's result from the receiver's answer (its status and the start of its body)."""
    status = response.status_code
    kind = classify_status(status)
    error_code = failure = None
    if kind is not AttemptKind.DELIVERED:
        error_code = {AttemptKind.GONE: "gone"}.get(kind, "http_status")
        failure = f"HTTP {status}"
        if 300 <= status < 400:
            error_code = "redirect"
            location = response.headers.get("location", "")[:500]
            failure = f"HTTP {status}: redirect to {location!r} not followed; update the URL"
    return AttemptResult(
        kind,
        latency_ms,
        error_code=error_code,
        error=failure,
        response_status=status,
        response_body=storable(excerpt.decode("utf-8", "replace")),
        address=address,
        retry_after=retry_after_seconds(response.headers),
    )


async def _read_some(response: httpx.Response, limit: int, deadline: float) -> bytes:
    """Up to `limit` bytes of the body, as they came (never decompressed), by `deadline`.

    The status line is the answer; the body is kept only for the record, so a body that is
    huge, slow or broken is cut short without changing the outcome.
    """
    received = bytearray()
    if limit <= 0:
        return b""
    try:
        async with asyncio.timeout_at(deadline):
            raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            async with aclosing(raw) as chunks:
                async for chunk in chunks:
                    received += chunk
                    if len(received) >= limit:
                        break
    except (TimeoutError, httpx.HTTPError):
        pass
    return bytes(received[:limit])


async def sweep_events(session_factory: SessionFactory, grace: timedelta) -> list[EventJob]:
    """Pending events due for longer than `grace` whose job seems lost: not in flight, and not
    waiting for an earlier event of their line (that one wakes them)."""
    now = datetime.now(UTC)
    earlier = aliased(WebhookEvent)
    waiting = (
        select(earlier.seq)
        .where(
            earlier.endpoint_id == WebhookEvent.endpoint_id,
            earlier.ordering_key == WebhookEvent.ordering_key,
            earlier.seq < WebhookEvent.seq,
            earlier.status == EventStatus.PENDING.value,
        )
        .exists()
    )
    async with session_factory.begin() as session:
        due = await session.scalars(
            select(WebhookEvent.id)
            .where(
                WebhookEvent.status == EventStatus.PENDING.value,
                WebhookEvent.next_attempt_at < now - grace,
                or_(WebhookEvent.in_flight_until.is_(None), WebhookEvent.in_flight_until < now),
                ~waiting,
            )
            .order_by(WebhookEvent.next_attempt_at)
            .limit(SWEEP_BATCH)
        )
        return [EventJob(event_id) for event_id in due]
