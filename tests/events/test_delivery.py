"""Delivering events to a real receiver on 127.0.0.1: signatures, answers, retries and backoff,
redirects, bounded responses, destination checks at delivery time, ordering, concurrency."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db.models import (
    Message,
    SigningSecret,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
)
from app.db.session import SessionFactory
from app.events.delivery import (
    EventOutcome,
    EventRetryPolicy,
    build_events_http_client,
    classify_status,
    deliver_event,
    sweep_events,
)
from app.events.destinations import IPAddress
from app.events.endpoints import Owner, set_default
from app.events.outbox import EventJob, EventStatus, emit_message_status, scheduled
from app.events.signing import active_secrets, rotate
from app.kernel.settings import EventsSettings
from app.worker.queue import create_queue, enqueue_events
from tests.conftest import TEST_REDIS_URL, World
from tests.domain.test_delivery import queued_message
from tests.events.conftest import StartReceiver
from tests.events.support import (
    closed_port,
    drip,
    drop,
    events_settings,
    flood,
    hang,
    respond,
    run_events_worker,
    verify_standard_webhook,
)

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

# ---- Arranging ----


async def client_endpoint(session_factory: SessionFactory, world: World, url: str) -> uuid.UUID:
    """Make `url` the client's default endpoint (no destination check: tests choose)."""
    async with session_factory.begin() as session:
        endpoint = await set_default(session, Owner(client_id=world.client_id), url)
    return endpoint.id


async def message_event(
    session_factory: SessionFactory,
    world: World,
    *,
    status: str = "delivered",
    message_id: uuid.UUID | None = None,
    **fields: Any,
) -> uuid.UUID:
    """A message of the client's in `status` (or move `message_id` there) and its event."""
    if message_id is None:
        message_id = await queued_message(session_factory, world, status=status, **fields)
    async with session_factory.begin() as session:
        await session.execute(update(Message).where(Message.id == message_id).values(status=status))
        await emit_message_status(session, message_id)
        jobs = scheduled(session)
    assert len(jobs) == 1
    return jobs[0].event_id


async def enqueue(*event_ids: uuid.UUID) -> None:
    queue = create_queue(TEST_REDIS_URL)
    try:
        await enqueue_events(queue, [EventJob(event_id) for event_id in event_ids])
    finally:
        await queue.aclose(close_connection_pool=True)


async def deliver(
    session_factory: SessionFactory,
    event_id: uuid.UUID,
    settings: EventsSettings | None = None,
    **kwargs: Any,
) -> EventOutcome:
    settings = settings or events_settings()
    async with build_events_http_client(settings) as http:
        return await deliver_event(event_id, session_factory, http, settings, **kwargs)


async def load_event(session_factory: SessionFactory, event_id: uuid.UUID) -> WebhookEvent:
    async with session_factory() as session:
        event = await session.scalar(select(WebhookEvent).where(WebhookEvent.id == event_id))
        assert event is not None
        return event


async def attempts_of(session_factory: SessionFactory, event_id: uuid.UUID) -> list[WebhookAttempt]:
    async with session_factory() as session:
        return list(
            await session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.event_id == event_id)
                .order_by(WebhookAttempt.id)
            )
        )


async def secrets_of(session_factory: SessionFactory, owner: Owner) -> list[str]:
    async with session_factory.begin() as session:
        return [secret.secret for secret in await active_secrets(session, owner)]


def fixed_resolver(*addresses: str, calls: list[str] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(host)
        return [ipaddress.ip_address(address) for address in addresses]

    return resolve


# ---- A delivered event ----


async def test_an_event_is_posted_signed_per_standard_webhooks_and_recorded(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(respond(204))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world, status="delivered")

    outcome = await deliver(session_factory, event_id)

    assert outcome.status is EventStatus.DELIVERED
    [request] = receiver.received
    assert (request.method, request.path) == ("POST", "/hook")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == str(event_id)
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    [secret] = await secrets_of(session_factory, Owner(client_id=world.client_id))
    assert secret.startswith("whsec_")
    assert verify_standard_webhook(secret, request.headers, request.body)
    assert not verify_standard_webhook(secret, request.headers, request.body + b" ")
    assert not verify_standard_webhook(secret, {**request.headers, "webhook-id": "x"}, request.body)
    payload = request.json()
    assert payload["id"] == str(event_id)
    assert payload["type"] == "message.delivered"
    assert payload["data"]["status"] == "delivered"
    assert payload["data"]["from"] == "+14155550100"
    datetime.fromisoformat(payload["timestamp"])
    event = await load_event(session_factory, event_id)
    assert (event.status, event.attempts) == ("delivered", 1)
    assert event.delivered_at is not None and event.in_flight_until is None
    [attempt] = await attempts_of(session_factory, event_id)
    assert (attempt.number, attempt.status, attempt.response_status) == (1, "succeeded", 204)
    assert attempt.address == "127.0.0.1" and attempt.url == receiver.url()
    assert 0 <= attempt.latency_ms < 2000


async def test_a_rotation_signs_with_the_new_and_old_secrets_until_the_old_expires(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    owner = Owner(client_id=world.client_id)
    [old] = await secrets_of(session_factory, owner)
    async with session_factory.begin() as session:
        rotated = [s.secret for s in await rotate(session, owner, timedelta(hours=1))]
    new = rotated[0]
    assert rotated == [new, old] and new != old

    await deliver(session_factory, await message_event(session_factory, world))

    request = receiver.received[0]
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # Each secret verifies on its own: receivers may switch whenever they like.
    assert verify_standard_webhook(new, request.headers, request.body)
    assert verify_standard_webhook(old, request.headers, request.body)

    async with session_factory.begin() as session:
        newest = (await rotate(session, owner, timedelta(0)))[0].secret  # revoke the others now
    await deliver(session_factory, await message_event(session_factory, world))

    request = receiver.received[1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    assert verify_standard_webhook(newest, request.headers, request.body)
    assert not verify_standard_webhook(new, request.headers, request.body)
    assert not verify_standard_webhook(old, request.headers, request.body)
    async with session_factory() as session:
        stored = list(await session.scalars(select(SigningSecret)))
    assert len(stored) == 3  # kept, expired


# ---- Retries and backoff ----


async def test_failures_are_retried_with_exponential_backoff_until_the_receiver_recovers(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    receiver = await receivers(
        respond(500),
        respond(503),
        respond(429, headers={"Retry-After": "1"}),
        drop(),  # a connection closed without an answer
        default=respond(200, b"thanks"),
    )
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    await enqueue(event_id)
    settings = events_settings(retry_base_delay_seconds=0.1, retry_max_delay_seconds=2.0)

    await run_events_worker(settings)

    assert len(receiver.received) == 5
    assert {r.headers["webhook-id"] for r in receiver.received} == {str(event_id)}
    attempts = await attempts_of(session_factory, event_id)
    assert [(a.number, a.status, a.response_status, a.error_code) for a in attempts] == [
        (1, "failed", 500, "http_status"),
        (2, "failed", 503, "http_status"),
        (3, "failed", 429, "http_status"),
        (4, "failed", None, "connection_error"),
        (5, "succeeded", 200, None),
    ]
    assert attempts[-1].response_body == "thanks"
    event = await load_event(session_factory, event_id)
    assert (event.status, event.attempts, event.last_error) == ("delivered", 5, None)
    # Waits double (each between half and all of base * 2^(n-1)), and Retry-After is honoured.
    times = [r.at for r in receiver.received]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.05 * 0.9
    assert gaps[1] >= 0.10 * 0.9
    assert gaps[2] >= 1.0 * 0.9  # Retry-After: 1, longer than the backoff
    assert gaps[3] >= 0.40 * 0.9


def test_the_default_backoff_spreads_retries_over_about_a_day() -> None:
    policy = EventRetryPolicy.of(EventsSettings())
    elapsed, attempts = 0.0, 1
    while elapsed + (delay := policy.delay(attempts)) <= policy.window.total_seconds():
        elapsed += delay
        attempts += 1

    assert policy.window == timedelta(days=1)
    assert 15 <= attempts <= 30
    assert elapsed > timedelta(hours=20).total_seconds()
    for attempt in range(1, 40):
        ceiling = min(7200.0, 5.0 * 2 ** (attempt - 1))
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(1, retry_after=60) == 60
    assert policy.delay(1, retry_after=10**6) == 7200  # a Retry-After never stalls it for long


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (301, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (404, "permanent"),
        (408, "retryable"),
        (410, "gone"),
        (429, "retryable"),
        (500, "retryable"),
        (502, "retryable"),
        (504, "retryable"),
    ],
)
def test_answers_are_classified(status: int, kind: str) -> None:
    assert classify_status(status).value == kind


async def test_a_receiver_that_does_not_answer_times_out_and_is_retried(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(default=hang())
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    started = time.monotonic()

    outcome = await deliver(
        session_factory,
        event_id,
        events_settings(
            timeout_seconds=0.5,
            retry_base_delay_seconds=60,
            retry_max_delay_seconds=120,
            retry_window_seconds=3600,
        ),
    )

    assert time.monotonic() - started < 2.0
    assert outcome.status is EventStatus.PENDING and outcome.retry_in is not None
    [attempt] = await attempts_of(session_factory, event_id)
    assert (attempt.status, attempt.error_code) == ("failed", "timeout")
    assert 400 <= attempt.latency_ms < 1500
    event = await load_event(session_factory, event_id)
    assert event.status == "pending"
    assert event.next_attempt_at > datetime.now(UTC) + timedelta(seconds=25)  # 30 to 60 s
    assert event.in_flight_until is None


async def test_a_refused_connection_is_retried(
    session_factory: SessionFactory, world: World
) -> None:
    await client_endpoint(session_factory, world, f"http://127.0.0.1:{closed_port()}/hook")
    event_id = await message_event(session_factory, world)

    outcome = await deliver(session_factory, event_id)

    assert outcome.status is EventStatus.PENDING and outcome.retry_in is not None
    [attempt] = await attempts_of(session_factory, event_id)
    assert (attempt.error_code, attempt.response_status) == ("connection_error", None)


async def test_an_event_is_given_up_at_the_end_of_its_retry_window(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    receiver = await receivers(default=respond(503))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    await enqueue(event_id)

    await run_events_worker(
        events_settings(
            retry_window_seconds=1, retry_base_delay_seconds=0.1, retry_max_delay_seconds=0.3
        )
    )

    event = await load_event(session_factory, event_id)
    assert event.status == "failed"
    assert event.last_error == f"gave up after {event.attempts} attempts: HTTP 503"
    assert 2 <= event.attempts == len(receiver.received) <= 10


# ---- Answers that end it ----


async def test_410_gone_disables_the_endpoint(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(respond(410))
    endpoint_id = await client_endpoint(session_factory, world, receiver.url())
    first = await message_event(session_factory, world)
    second = await message_event(session_factory, world)

    assert (await deliver(session_factory, first)).status is EventStatus.FAILED
    assert (await deliver(session_factory, second)).status is EventStatus.FAILED

    assert len(receiver.received) == 1  # the second was never sent
    async with session_factory() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
    assert endpoint is not None and endpoint.disabled_at is not None
    assert endpoint.disabled_reason == "the receiver answered 410 Gone"
    assert (await attempts_of(session_factory, first))[0].error_code == "gone"
    assert await attempts_of(session_factory, second) == []
    assert (await load_event(session_factory, second)).last_error == (
        "endpoint disabled: the receiver answered 410 Gone"
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_4xx_fail_the_event_at_once(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, status: int
) -> None:
    receiver = await receivers(default=respond(status))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)

    outcome = await deliver(session_factory, event_id)

    assert outcome == EventOutcome(EventStatus.FAILED)
    event = await load_event(session_factory, event_id)
    assert (event.status, event.attempts, event.last_error) == ("failed", 1, f"HTTP {status}")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_not_followed(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, status: int
) -> None:
    elsewhere = await receivers()
    receiver = await receivers(respond(status, headers={"Location": elsewhere.url("/moved")}))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)

    outcome = await deliver(session_factory, event_id)

    assert outcome.status is EventStatus.FAILED
    assert elsewhere.received == []
    [attempt] = await attempts_of(session_factory, event_id)
    assert (attempt.error_code, attempt.response_status) == ("redirect", status)
    assert "not followed" in (attempt.error or "")


# ---- A response cannot hold a worker ----


async def test_a_huge_response_is_read_only_in_part(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(flood(200, size=256 * 1024 * 1024))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    started = time.monotonic()

    outcome = await deliver(
        session_factory, event_id, events_settings(max_response_bytes=100, timeout_seconds=10)
    )

    assert time.monotonic() - started < 3.0  # 256 MB were not read
    assert outcome.status is EventStatus.DELIVERED
    [attempt] = await attempts_of(session_factory, event_id)
    assert attempt.response_body == "y" * 100


async def test_a_slow_response_is_cut_at_the_timeout(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(drip(200, interval=0.05))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    started = time.monotonic()

    outcome = await deliver(
        session_factory,
        event_id,
        events_settings(timeout_seconds=0.5, max_response_bytes=1024 * 1024),
    )

    assert time.monotonic() - started < 1.5
    # The status line arrived in time: that is the receiver's answer.
    assert outcome.status is EventStatus.DELIVERED
    [attempt] = await attempts_of(session_factory, event_id)
    assert attempt.latency_ms < 1500
    assert 0 < len(attempt.response_body or "") < 100


# ---- Destinations are checked again at delivery time ----

REFUSED_AT_DELIVERY = [
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.9", "private"),
    ("172.31.255.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
]


@pytest.mark.parametrize(("address", "kind"), REFUSED_AT_DELIVERY)
async def test_a_name_that_now_resolves_into_our_network_is_refused_at_delivery(
    session_factory: SessionFactory,
    world: World,
    receivers: StartReceiver,
    address: str,
    kind: str,
) -> None:
    receiver = await receivers()
    # Accepted when it pointed elsewhere; its DNS record has changed since.
    await client_endpoint(session_factory, world, f"http://hooks.example.test:{receiver.port}/")
    event_id = await message_event(session_factory, world)

    outcome = await deliver(
        session_factory,
        event_id,
        events_settings(allowed_networks=[]),
        resolver=fixed_resolver(address),
    )

    assert outcome.status is EventStatus.FAILED
    assert receiver.received == []
    [attempt] = await attempts_of(session_factory, event_id)
    assert attempt.error_code == "destination_refused"
    assert f"resolves to {address}, which is a" in (attempt.error or "")
    assert kind in (attempt.error or "")


async def test_an_address_no_longer_allowed_is_refused_at_delivery(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())  # allowed when set
    event_id = await message_event(session_factory, world)

    outcome = await deliver(session_factory, event_id, events_settings(allowed_networks=[]))

    assert outcome.status is EventStatus.FAILED
    assert receiver.received == []  # it listens on 127.0.0.1: nothing connected to it
    [attempt] = await attempts_of(session_factory, event_id)
    assert attempt.error == "destination refused: 127.0.0.1 is a loopback address"


async def test_a_name_is_refused_if_any_of_its_addresses_is(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, f"http://mixed.example.test:{receiver.port}/")
    event_id = await message_event(session_factory, world)

    await deliver(
        session_factory,
        event_id,
        events_settings(allowed_networks=[]),
        resolver=fixed_resolver("93.184.215.14", "10.0.0.5"),
    )

    [attempt] = await attempts_of(session_factory, event_id)
    assert attempt.error_code == "destination_refused" and "10.0.0.5" in (attempt.error or "")


async def test_the_attempt_connects_to_the_address_that_was_checked(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    host = f"rebind.example.test:{receiver.port}"
    await client_endpoint(session_factory, world, f"http://{host}/hook")
    event_id = await message_event(session_factory, world)
    lookups: list[str] = []

    outcome = await deliver(
        session_factory, event_id, resolver=fixed_resolver("127.0.0.1", calls=lookups)
    )

    # One lookup, and the connection went to its answer (the name itself resolves nowhere).
    assert outcome.status is EventStatus.DELIVERED
    assert lookups == ["rebind.example.test"]
    [request] = receiver.received
    assert request.headers["host"] == host
    assert (await attempts_of(session_factory, event_id))[0].address == "127.0.0.1"


async def test_a_name_that_does_not_resolve_for_now_is_retried(
    session_factory: SessionFactory, world: World
) -> None:
    async def failing(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    await client_endpoint(session_factory, world, "https://hooks.example.test/")
    event_id = await message_event(session_factory, world)

    outcome = await deliver(session_factory, event_id, resolver=failing)

    assert outcome.status is EventStatus.PENDING and outcome.retry_in is not None
    assert (await attempts_of(session_factory, event_id))[0].error_code == "dns_error"


# ---- Order, leases and the per-endpoint limit ----


async def test_a_messages_events_are_delivered_in_order(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    receiver = await receivers(respond(503), respond(503), default=respond(204))
    await client_endpoint(session_factory, world, receiver.url())
    message_id = await queued_message(session_factory, world, status="sending")
    sent = await message_event(session_factory, world, status="sent", message_id=message_id)
    delivered = await message_event(
        session_factory, world, status="delivered", message_id=message_id
    )

    # The later event waits while the earlier one is pending.
    assert await deliver(session_factory, delivered) == EventOutcome(EventStatus.PENDING)
    assert receiver.received == []

    await enqueue(delivered, sent)  # the queue's order does not matter
    await run_events_worker(events_settings(retry_base_delay_seconds=0.05))

    types = [request.json()["type"] for request in receiver.received]
    assert types == ["message.sent", "message.sent", "message.sent", "message.delivered"]
    assert (await load_event(session_factory, delivered)).status == "delivered"


async def test_the_next_event_is_enqueued_when_the_one_before_is_done(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    message_id = await queued_message(session_factory, world, status="sending")
    sent = await message_event(session_factory, world, status="sent", message_id=message_id)
    delivered = await message_event(
        session_factory, world, status="delivered", message_id=message_id
    )

    outcome = await deliver(session_factory, sent)

    assert outcome.jobs == (EventJob(delivered, tag=f"after-{sent}"),)


async def test_an_event_in_flight_elsewhere_is_left_alone(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    async with session_factory.begin() as session:
        await session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(in_flight_until=datetime.now(UTC) + timedelta(minutes=1))
        )

    outcome = await deliver(session_factory, event_id)

    assert outcome == EventOutcome(EventStatus.PENDING)
    assert receiver.received == []


async def test_one_endpoint_gets_at_most_the_configured_attempts_at_once(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(default=hang())
    await client_endpoint(session_factory, world, receiver.url())
    events = [await message_event(session_factory, world) for _ in range(3)]
    settings = events_settings(max_in_flight_per_endpoint=2, timeout_seconds=1.0)

    running = [asyncio.create_task(deliver(session_factory, e, settings)) for e in events[:2]]
    await receiver.wait_for(2)
    third = await deliver(session_factory, events[2], settings)

    assert third.status is EventStatus.PENDING
    assert third.retry_in is not None and 0.5 <= third.retry_in <= 1.0
    assert len(receiver.received) == 2
    assert (await load_event(session_factory, events[2])).attempts == 0
    for outcome in await asyncio.gather(*running):
        assert outcome.retry_in is not None  # timed out: retried later

    # Slots free again once those attempts are over.
    await deliver(session_factory, events[2], settings)
    assert len(receiver.received) == 3


async def test_the_sweep_finds_events_whose_job_was_lost(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    message_id = await queued_message(session_factory, world, status="sending")
    lost = await message_event(session_factory, world, status="sent", message_id=message_id)
    waiting = await message_event(session_factory, world, status="delivered", message_id=message_id)
    in_flight = await message_event(session_factory, world)
    recent = await message_event(session_factory, world)
    async with session_factory.begin() as session:
        await session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id.in_([lost, waiting, in_flight]))
            .values(next_attempt_at=datetime.now(UTC) - timedelta(minutes=5))
        )
        await session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == in_flight)
            .values(in_flight_until=datetime.now(UTC) + timedelta(minutes=1))
        )

    jobs = await sweep_events(session_factory, grace=timedelta(seconds=30))

    # `waiting` waits for `lost` (which wakes it); `in_flight` is being tried; `recent` has a job.
    assert jobs == [EventJob(lost)]
    assert recent not in {job.event_id for job in jobs}


async def test_the_body_sent_is_the_stored_payload(
    session_factory: SessionFactory, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world, metadata_={"order_id": "1042 ✓"})

    await deliver(session_factory, event_id)

    event = await load_event(session_factory, event_id)
    assert json.loads(receiver.received[0].body) == event.payload
    assert event.payload["data"]["metadata"] == {"order_id": "1042 ✓"}


async def test_an_event_long_past_its_window_is_given_up_when_claimed(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    # Its earlier attempts crashed before being recorded, so nothing gave it up: the claim does.
    receiver = await receivers()
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    async with session_factory.begin() as session:
        await session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(retry_until=datetime.now(UTC) - timedelta(days=1), attempts=3)
        )
    await enqueue(event_id)

    await run_events_worker(events_settings())

    event = await load_event(session_factory, event_id)
    assert (event.status, event.last_error) == ("failed", "retry window over")
    assert receiver.received == []


async def test_an_unreadable_retry_after_is_ignored_not_fatal(
    session_factory: SessionFactory, world: World, receivers: StartReceiver, redis: Any
) -> None:
    receiver = await receivers(default=respond(503, headers={"Retry-After": "²"}))
    await client_endpoint(session_factory, world, receiver.url())
    event_id = await message_event(session_factory, world)
    await enqueue(event_id)

    await run_events_worker(
        events_settings(
            retry_window_seconds=1, retry_base_delay_seconds=0.1, retry_max_delay_seconds=0.3
        )
    )

    event = await load_event(session_factory, event_id)
    assert event.status == "failed" and event.attempts == len(receiver.received) >= 2
