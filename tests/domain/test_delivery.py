"""deliver_message: claim, provider call at the HTTP boundary, outcome, retries, expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import Message, MessageEvent, OptOut, Sender
from app.db.session import SessionFactory
from app.delivery.pipeline import RetryPolicy, deliver_message
from app.kernel.status import MessageStatus
from app.providers.base import Provider
from app.providers.twilio import TwilioProvider, TwilioSettings
from app.providers.vonage import VonageProvider, VonageSettings
from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, World, make_settings
from tests.providers.vonage_spec import assert_valid_send_sms

VONAGE_HOST = httpx.URL(VonageSettings().base_url).host
POLICY = RetryPolicy(max_attempts=3, base_delay=1.0, max_delay=10.0)
Handler = Callable[[httpx.Request], httpx.Response]


class RecordingProvider:
    """A provider API faked at the HTTP boundary, keeping every request it receives."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self.handler = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == VONAGE_HOST:
            assert_valid_send_sms(request)  # every Vonage request, against Vonage's spec
        return self.handler(request)

    def providers(self) -> dict[str, Provider]:
        settings = make_settings()
        http = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return {
            "twilio": TwilioProvider(
                settings.section("twilio", TwilioSettings), http, PUBLIC_BASE_URL
            ),
            "vonage": VonageProvider(
                settings.section("vonage", VonageSettings), http, PUBLIC_BASE_URL
            ),
        }


def twilio_created(request: httpx.Request) -> httpx.Response:
    form = parse_qs(request.content.decode())
    return httpx.Response(
        201,
        json={
            "sid": "SM" + "ab" * 16,
            "account_sid": TWILIO_SID,
            "status": "queued",
            "to": form["To"][0],
            "from": form["From"][0],
            "body": form["Body"][0],
        },
    )


def twilio_error(status: int, code: int, message: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json={"code": code, "message": message, "more_info": "", "status": status}
        )

    return handler


def raising(error: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return handler


async def queued_message(
    session_factory: SessionFactory, world: World, sender: Sender | None = None, **fields: Any
) -> uuid.UUID:
    sender = sender or world.twilio_sender
    values: dict[str, Any] = {"status": "queued", **fields}
    message = Message(
        id=uuid.uuid4(),
        client_id=world.client_id,
        sender_id=sender.id,
        to="+14155550123",
        from_=sender.address,
        body="Your order #1042 has shipped.",
        encoding="GSM-7",
        segments=1,
        provider=sender.provider,
        **values,
    )
    async with session_factory.begin() as session:
        session.add(message)
    return message.id


async def load(session_factory: SessionFactory, message_id: uuid.UUID) -> Message:
    async with session_factory() as session:
        message = await session.get(Message, message_id)
        assert message is not None
        return message


async def make_due(session_factory: SessionFactory, message_id: uuid.UUID) -> None:
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).where(Message.id == message_id).values(next_attempt_at=func.now())
        )


async def history(session_factory: SessionFactory, message_id: uuid.UUID) -> list[str | None]:
    async with session_factory() as session:
        return list(
            await session.scalars(
                select(MessageEvent.status)
                .where(MessageEvent.message_id == message_id, MessageEvent.applied.is_(True))
                .order_by(MessageEvent.id)
            )
        )


async def test_submits_to_twilio_and_records_the_sid(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.SENT
    assert len(provider.requests) == 1
    form = parse_qs(provider.requests[0].content.decode())
    assert form["To"] == ["+14155550123"]
    assert form["From"] == ["+14155550100"]
    assert form["StatusCallback"] == [
        f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id={message_id}"
    ]
    message = await load(session_factory, message_id)
    assert message.status == "sent"
    assert message.provider_message_id == "SM" + "ab" * 16
    assert message.attempts == 1
    assert await history(session_factory, message_id) == ["sending", "sent"]


async def test_submits_to_vonage_with_our_id_as_client_ref(
    session_factory: SessionFactory, world: World
) -> None:
    def vonage_ok(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "message-count": "1",
                "messages": [
                    {
                        "to": "14155550123",
                        "message-id": "0A0000000123ABCD1",
                        "status": "0",
                        "remaining-balance": "3.14159265",
                        "message-price": "0.03330000",
                        "network": "12345",
                    }
                ],
            },
        )

    provider = RecordingProvider(vonage_ok)
    message_id = await queued_message(session_factory, world, sender=world.vonage_sender)

    await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    form = parse_qs(provider.requests[0].content.decode())
    assert form["client-ref"] == [str(message_id)]
    assert form["from"] == ["ACME"]
    message = await load(session_factory, message_id)
    assert (message.status, message.provider_message_id) == ("sent", "0A0000000123ABCD1")


async def test_a_job_that_runs_twice_sends_once(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    providers = provider.providers()
    message_id = await queued_message(session_factory, world)

    outcomes = await asyncio.gather(
        *(deliver_message(message_id, session_factory, providers, POLICY) for _ in range(5))
    )
    again = await deliver_message(message_id, session_factory, providers, POLICY)

    assert len(provider.requests) == 1
    assert [o.status for o in outcomes].count(MessageStatus.SENT) == 1
    assert again.status is None
    assert (await load(session_factory, message_id)).attempts == 1


async def test_a_permanent_provider_error_fails_the_message_with_its_code(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_error(400, 21211, "The 'To' number is not valid."))
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.FAILED and outcome.retry_in is None
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("failed", "21211")
    assert message.error_message == "The 'To' number is not valid."
    assert len(provider.requests) == 1


@pytest.mark.parametrize(
    "handler",
    [
        twilio_error(500, 20500, "Internal Server Error"),
        twilio_error(429, 20429, "Too Many Requests"),
        twilio_error(503, 20503, "Service Unavailable"),
        raising(httpx.ConnectError),
        raising(httpx.ConnectTimeout),
    ],
)
async def test_a_retryable_error_requeues_with_backoff(
    session_factory: SessionFactory, world: World, handler: Handler
) -> None:
    provider = RecordingProvider(handler)
    message_id = await queued_message(session_factory, world)
    before = datetime.now(UTC)

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.QUEUED
    assert outcome.retry_in is not None and 0.5 <= outcome.retry_in <= 1.0  # attempt 1: base
    message = await load(session_factory, message_id)
    assert message.status == "queued"
    assert message.next_attempt_at >= before + timedelta(seconds=0.5)
    assert message.attempts == 1


async def test_retries_stop_after_the_attempt_limit(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_error(503, 20503, "Service Unavailable"))
    providers = provider.providers()
    message_id = await queued_message(session_factory, world)

    delays = []
    for _ in range(POLICY.max_attempts):
        outcome = await deliver_message(message_id, session_factory, providers, POLICY)
        delays.append(outcome.retry_in)
        await make_due(session_factory, message_id)  # as if the backoff had passed

    # Exponential with jitter: attempt n waits between half and all of base * 2**(n-1).
    first, second, third = delays
    assert first is not None and 0.5 <= first <= 1.0
    assert second is not None and 1.0 <= second <= 2.0
    assert third is None
    message = await load(session_factory, message_id)
    assert message.status == "failed"
    assert message.error_message is not None and "gave up after 3 attempts" in message.error_message
    assert len(provider.requests) == 3


async def test_retry_after_from_the_provider_is_honoured(
    session_factory: SessionFactory, world: World
) -> None:
    def throttled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            headers={"Retry-After": "7"},
            json={"code": 20429, "message": "Too Many Requests", "status": 429},
        )

    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(
        message_id, session_factory, RecordingProvider(throttled).providers(), POLICY
    )

    assert outcome.retry_in == 7.0


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.RemoteProtocolError])
async def test_an_unknown_outcome_is_never_resent_blindly(
    session_factory: SessionFactory, world: World, error: type[httpx.TransportError]
) -> None:
    provider = RecordingProvider(raising(error))
    providers = provider.providers()
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, providers, POLICY)
    await deliver_message(message_id, session_factory, providers, POLICY)

    assert outcome.status is MessageStatus.SENDING and outcome.retry_in is None
    assert len(provider.requests) == 1
    assert (await load(session_factory, message_id)).status == "sending"


async def test_an_expired_message_is_not_sent(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    message_id = await queued_message(
        session_factory,
        world,
        validity_period=60,
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
    )

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.EXPIRED
    assert provider.requests == []
    assert (await load(session_factory, message_id)).status == "expired"


async def test_the_remaining_validity_is_passed_to_the_provider(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    message_id = await queued_message(
        session_factory,
        world,
        validity_period=600,
        expires_at=datetime.now(UTC) + timedelta(seconds=600),
    )

    await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    validity = int(parse_qs(provider.requests[0].content.decode())["ValidityPeriod"][0])
    assert 590 <= validity <= 600


async def test_a_recipient_who_opted_out_after_acceptance_is_not_texted(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    message_id = await queued_message(session_factory, world)
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone="+14155550123",
                sender_id=world.twilio_sender.id,
                action="opt_out",
                source="keyword",
            )
        )

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.CANCELED
    assert provider.requests == []
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("canceled", "recipient_opted_out")


async def test_a_provider_without_credentials_fails_the_message_clearly(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, {}, POLICY)

    assert outcome.status is MessageStatus.FAILED
    message = await load(session_factory, message_id)
    assert message.error_code == "provider_not_configured"


async def test_a_missing_message_is_nothing_to_do(session_factory: SessionFactory) -> None:
    provider = RecordingProvider(twilio_created)

    outcome = await deliver_message(uuid.uuid4(), session_factory, provider.providers(), POLICY)

    assert outcome.status is None and provider.requests == []


async def test_a_job_that_starts_before_its_retry_is_due_waits_instead_of_sending(
    session_factory: SessionFactory, world: World
) -> None:
    provider = RecordingProvider(twilio_created)
    message_id = await queued_message(
        session_factory, world, next_attempt_at=datetime.now(UTC) + timedelta(seconds=30)
    )

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.QUEUED
    assert outcome.retry_in is not None and 29 <= outcome.retry_in <= 30
    assert provider.requests == []


async def test_a_retry_after_longer_than_the_maximum_delay_is_capped(
    session_factory: SessionFactory, world: World
) -> None:
    def far_future(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, headers={"Retry-After": "86400"}, json={"code": 20429, "message": "Slow down"}
        )

    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(
        message_id, session_factory, RecordingProvider(far_future).providers(), POLICY
    )

    assert outcome.retry_in == POLICY.max_delay


async def test_no_database_connection_is_held_during_the_provider_call(
    session_factory: SessionFactory, world: World, engine: AsyncEngine
) -> None:
    checked_out: list[int] = []

    def observing(request: httpx.Request) -> httpx.Response:
        checked_out.append(engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]
        return twilio_created(request)

    message_id = await queued_message(session_factory, world)

    await deliver_message(
        message_id, session_factory, RecordingProvider(observing).providers(), POLICY
    )

    assert checked_out == [0]


async def test_a_cancelled_provider_call_is_recorded_as_an_unknown_outcome(
    session_factory: SessionFactory, world: World
) -> None:
    started = asyncio.Event()

    async def hanging(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    settings = make_settings()
    http = httpx.AsyncClient(transport=httpx.MockTransport(hanging))
    providers: dict[str, Provider] = {
        "twilio": TwilioProvider(settings.section("twilio", TwilioSettings), http, PUBLIC_BASE_URL)
    }
    message_id = await queued_message(session_factory, world)

    task = asyncio.create_task(deliver_message(message_id, session_factory, providers, POLICY))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async with session_factory() as session:
        details = list(await session.scalars(select(MessageEvent.detail)))
    assert (await load(session_factory, message_id)).status == "sending"
    assert any(d and d.startswith("outcome unknown: provider call interrupted") for d in details)
