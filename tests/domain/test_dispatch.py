"""The delivery gate in `deliver_message`: sender pacing, provider pauses, circuit breakers and
failover. Real PostgreSQL and Redis; providers faked at the HTTP boundary."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import select, update

from app.db.models import MessageEvent, Sender
from app.db.session import SessionFactory
from app.delivery.dispatch import RUN_HORIZON_SECONDS, Dispatcher, Go, Ticket, Wait
from app.delivery.pacing import SenderPacer
from app.delivery.pipeline import deliver_message
from app.kernel.status import MessageStatus
from app.providers.base import Provider
from app.worker.guarantees import build_dispatcher
from tests.conftest import World, make_settings
from tests.domain.test_delivery import (
    POLICY,
    RecordingProvider,
    load,
    queued_message,
    twilio_created,
    twilio_error,
)
from tests.providers.vonage_spec import assert_valid_send_sms


def vonage_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"message-count": "1", "messages": [{"status": "0", "message-id": "VON-1"}]}
    )


def by_host(request: httpx.Request, twilio: Any, vonage: Any = vonage_ok) -> httpx.Response:
    handler = vonage if "nexmo" in request.url.host else twilio
    if handler is vonage:
        assert_valid_send_sms(request)  # every Vonage request, against Vonage's spec
    response: httpx.Response = handler(request)
    return response


def gate(redis: Redis, providers: dict[str, Provider], **settings: Any) -> Dispatcher:
    return build_dispatcher(redis, make_settings(**settings), providers)


async def set_sender(session_factory: SessionFactory, sender: Sender, **values: Any) -> None:
    async with session_factory.begin() as session:
        await session.execute(update(Sender).where(Sender.id == sender.id).values(**values))


async def open_circuit(dispatcher: Dispatcher, provider: str) -> None:
    from app.providers.base import ErrorKind, ProviderError

    fault = ProviderError(ErrorKind.RETRYABLE, "HTTP 500", provider_fault=True)
    for _ in range(dispatcher.health.policy.failure_threshold):
        await dispatcher.health.record(provider, fault)


async def test_a_message_over_its_senders_rate_waits_without_an_attempt(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, rate_per_second=0.2)
    provider = RecordingProvider(twilio_created)
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    first = await queued_message(session_factory, world)
    second = await queued_message(session_factory, world)

    sent = await deliver_message(first, session_factory, providers, POLICY, dispatcher)
    waiting = await deliver_message(second, session_factory, providers, POLICY, dispatcher)

    assert sent.status is MessageStatus.SENT
    assert waiting.status is MessageStatus.QUEUED
    assert waiting.retry_in is not None and 3.0 <= waiting.retry_in <= 5.0
    message = await load(session_factory, second)
    assert (message.status, message.attempts) == ("queued", 0)
    assert len(provider.requests) == 1


async def test_an_open_circuit_moves_messages_to_the_fallback_provider(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, fallback_provider="vonage")
    provider = RecordingProvider(lambda r: by_host(r, twilio_created))
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    await open_circuit(dispatcher, "twilio")
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    assert outcome.status is MessageStatus.SENT
    assert [r.url.host for r in provider.requests] == ["rest.nexmo.com"]
    message = await load(session_factory, message_id)
    assert (message.provider, message.provider_message_id) == ("vonage", "VON-1")
    async with session_factory() as session:
        details = list(await session.scalars(select(MessageEvent.detail)))
    assert any(d and "failover" in d for d in details)


async def test_without_a_fallback_an_open_circuit_makes_messages_wait(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    provider = RecordingProvider(twilio_created)
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    await open_circuit(dispatcher, "twilio")
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    assert outcome.status is MessageStatus.QUEUED and outcome.retry_in is not None
    assert provider.requests == []
    assert (await load(session_factory, message_id)).attempts == 0


async def test_a_resubmitted_unknown_outcome_never_fails_over(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, fallback_provider="vonage")
    provider = RecordingProvider(lambda r: by_host(r, twilio_created))
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    await open_circuit(dispatcher, "twilio")
    message_id = await queued_message(session_factory, world, resubmissions=1, attempts=1)

    outcome = await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    assert outcome.status is MessageStatus.QUEUED  # waits for Twilio, which may have it
    assert provider.requests == []
    assert (await load(session_factory, message_id)).provider == "twilio"


async def test_provider_faults_open_the_circuit_and_stop_the_calls(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    await set_sender(session_factory, world.twilio_sender, rate_per_second=1000)
    provider = RecordingProvider(twilio_error(500, 20500, "Internal Server Error"))
    providers = provider.providers()
    dispatcher = gate(redis, providers, circuit_failure_threshold=3)
    messages = [await queued_message(session_factory, world) for _ in range(5)]

    outcomes = [
        await deliver_message(m, session_factory, providers, POLICY, dispatcher) for m in messages
    ]

    assert len(provider.requests) == 3
    assert [(await load(session_factory, m)).attempts for m in messages] == [1, 1, 1, 0, 0]
    assert all(o.status is MessageStatus.QUEUED for o in outcomes)


async def test_a_429_pauses_the_provider_for_every_message(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    def throttled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, headers={"Retry-After": "3"}, json={"code": 20429, "message": "Too Many"}
        )

    provider = RecordingProvider(throttled)
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    first = await queued_message(session_factory, world)
    other_sender = Sender(
        id=uuid.uuid4(), address="+14155550177", kind="long_code", provider="twilio", keywords={}
    )
    async with session_factory.begin() as session:
        session.add(other_sender)
    second = await queued_message(session_factory, world, sender=other_sender)

    await deliver_message(first, session_factory, providers, POLICY, dispatcher)
    held = await deliver_message(second, session_factory, providers, POLICY, dispatcher)

    assert len(provider.requests) == 1
    assert held.status is MessageStatus.QUEUED
    assert held.retry_in is not None and 2.5 <= held.retry_in <= 3.8
    assert (await load(session_factory, second)).attempts == 0


async def test_a_claim_whose_turn_passed_is_released_without_an_attempt(
    session_factory: SessionFactory, world: World, redis: Redis
) -> None:
    provider = RecordingProvider(twilio_created)
    providers = provider.providers()
    dispatcher = gate(redis, providers)
    message_id = await queued_message(session_factory, world)

    # The sender has a line (a message waits for a slot a second from now): no free run.
    seconds, micros = await redis.time()
    _, line = SenderPacer.run_keys(world.twilio_sender.id)
    await redis.set(line, f"{seconds * 1000 + micros / 1000 + 1000:.3f}", px=5000)

    async def too_late(*args: Any, **kwargs: Any) -> float:
        return 4.0  # e.g. the claim was slow and other messages took the next slots

    dispatcher.pacer.admit = too_late  # type: ignore[method-assign]
    outcome = await deliver_message(message_id, session_factory, providers, POLICY, dispatcher)

    assert (outcome.status, outcome.retry_in) == (MessageStatus.QUEUED, 4.0)
    message = await load(session_factory, message_id)
    assert (message.status, message.attempts) == ("queued", 0)
    assert provider.requests == []


async def test_a_jobs_run_of_slots_reaches_only_a_quarter_second_ahead(redis: Redis) -> None:
    """A run's messages go at their slots without asking Redis again; a Redis restart in the
    middle of one lets the sender go early by what is left of it, so runs are short. The rest
    of the job takes places in the sender's line (checked just before each call)."""
    providers = RecordingProvider(twilio_created).providers()
    dispatcher = gate(redis, providers)
    sender = uuid.uuid4()
    tickets = [Ticket(uuid.uuid4(), "twilio", sender, 10.0, None) for _ in range(10)]

    verdicts = await dispatcher.gate(tickets)

    goes = [v for v in verdicts.values() if isinstance(v, Go)]
    in_run = [v for v in goes if not v.in_line]
    assert len(in_run) == int(10.0 * RUN_HORIZON_SECONDS) + 1  # slots at 0, 0.1 and 0.2 s
    assert all(v.in_line for v in goes if v not in in_run)
    assert len(goes) + sum(isinstance(v, Wait) for v in verdicts.values()) == 10
