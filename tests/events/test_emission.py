"""Which changes become events, for which endpoint, written with the change and enqueued on the
events queue after commit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from app.consent.optouts import OptAction, OptChange, OptSource, record_change
from app.db.models import Message, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver_message
from app.delivery.transitions import record_status_report
from app.events.endpoints import Owner, set_default
from app.kernel.status import MessageStatus
from app.providers.base import StatusReport
from tests.api.test_inbound import twilio_inbound
from tests.api.test_status_callbacks import twilio_callback
from tests.conftest import World
from tests.domain.test_delivery import (
    POLICY,
    RecordingProvider,
    queued_message,
    twilio_created,
    twilio_error,
)
from tests.events.support import events_settings
from tests.queueing import queued_message_ids
from tests.test_end_to_end import run_worker

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

HOOK = "https://93.184.215.14/sms-events"  # never called here: no events worker runs
SENDER_HOOK = "https://93.184.215.15/inbound"


async def set_client_endpoint(
    session_factory: SessionFactory, client_id: uuid.UUID, url: str = HOOK
) -> None:
    async with session_factory.begin() as session:
        await set_default(session, Owner(client_id=client_id), url)


async def set_sender_endpoint(
    session_factory: SessionFactory, sender_id: uuid.UUID, url: str = SENDER_HOOK
) -> None:
    async with session_factory.begin() as session:
        await set_default(session, Owner(sender_id=sender_id), url)


async def events(session_factory: SessionFactory) -> list[tuple[str, str, dict[str, Any]]]:
    """(type, url, data) of every event, oldest first."""
    async with session_factory() as session:
        rows = await session.execute(
            select(WebhookEvent.type, WebhookEndpoint.url, WebhookEvent.payload)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookEvent.endpoint_id)
            .order_by(WebhookEvent.seq)
        )
        return [(kind, url, payload["data"]) for kind, url, payload in rows]


async def types(session_factory: SessionFactory) -> list[str]:
    return [kind for kind, _, _ in await events(session_factory)]


# ---- Message status changes ----


@pytest.mark.parametrize(
    "status",
    [
        MessageStatus.DELIVERED,
        MessageStatus.UNDELIVERED,
        MessageStatus.FAILED,
        MessageStatus.REJECTED,
    ],
)
async def test_a_reported_status_change_is_an_event_and_a_duplicate_is_not(
    session_factory: SessionFactory, world: World, status: MessageStatus
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    message_id = await queued_message(
        session_factory, world, status="sent", provider_message_id="SM" + "cd" * 16
    )
    report = StatusReport(
        provider_message_id="SM" + "cd" * 16,
        provider_status=status.value,
        status=status,
        message_id=message_id,
        error_code="30003" if status is not MessageStatus.DELIVERED else None,
    )

    for _ in range(2):  # providers repeat themselves
        await record_status_report(session_factory, "twilio", report)

    [(kind, url, data)] = await events(session_factory)
    assert kind == f"message.{status.value}"
    assert url == HOOK
    assert (data["id"], data["status"]) == (str(message_id), status.value)
    assert data["provider_message_id"] == "SM" + "cd" * 16


async def test_sent_and_failed_are_events_from_the_worker(
    session_factory: SessionFactory, world: World
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    sent = await queued_message(session_factory, world)
    failing = await queued_message(session_factory, world)

    accepted = await deliver_message(
        sent, session_factory, RecordingProvider(twilio_created).providers(), POLICY
    )
    refused = await deliver_message(
        failing,
        session_factory,
        RecordingProvider(twilio_error(400, 21211, "The 'To' number is not valid.")).providers(),
        POLICY,
    )

    found = await events(session_factory)
    assert [(kind, data["id"]) for kind, _, data in found] == [
        ("message.sent", str(sent)),
        ("message.failed", str(failing)),
    ]
    assert found[0][2]["provider_message_id"] == "SM" + "ab" * 16
    assert found[1][2]["error_code"] == "21211"
    # The worker's task enqueues these once the transaction has committed.
    assert len(accepted.events) == 1 and len(refused.events) == 1


async def test_expired_and_canceled_are_events_from_the_worker(
    session_factory: SessionFactory, world: World
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    expired = await queued_message(
        session_factory, world, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    canceled = await queued_message(session_factory, world)
    async with session_factory.begin() as session:
        await record_change(
            session,
            OptChange(
                phone="+14155550123",
                sender_id=world.twilio_sender.id,
                action=OptAction.OPT_OUT,
                source=OptSource.API,
                actor="client:shop",
            ),
        )
    providers = RecordingProvider(twilio_created).providers()

    outcomes = [
        await deliver_message(message_id, session_factory, providers, POLICY)
        for message_id in (expired, canceled)
    ]

    assert [o.status for o in outcomes] == [MessageStatus.EXPIRED, MessageStatus.CANCELED]
    assert await types(session_factory) == ["message.expired", "message.canceled"]
    assert all(len(o.events) == 1 for o in outcomes)


async def test_queued_and_sending_are_not_events(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_client_endpoint(session_factory, world.client_id)

    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth()
    )

    assert response.status_code == 202
    assert await types(session_factory) == []


async def test_a_callback_url_takes_the_place_of_the_default_endpoint(
    session_factory: SessionFactory, world: World
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    own = await queued_message(
        session_factory, world, callback_url="https://93.184.215.20/this-one"
    )
    default = await queued_message(session_factory, world)
    providers = RecordingProvider(twilio_created).providers()

    for message_id in (own, default):
        await deliver_message(message_id, session_factory, providers, POLICY)

    assert [url for _, url, _ in await events(session_factory)] == [
        "https://93.184.215.20/this-one",
        HOOK,
    ]


async def test_no_endpoint_no_events(session_factory: SessionFactory, world: World) -> None:
    message_id = await queued_message(session_factory, world)

    outcome = await deliver_message(
        message_id, session_factory, RecordingProvider(twilio_created).providers(), POLICY
    )

    assert outcome.status is MessageStatus.SENT
    assert await types(session_factory) == [] and outcome.events == ()


async def test_events_go_on_their_own_queue_after_commit(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    message_id = await queued_message(
        session_factory, world, status="sent", provider_message_id="SM" + "cd" * 16
    )

    response = await twilio_callback(api, message_id, "delivered")

    assert response.status_code == 204
    async with session_factory() as session:
        event_id = await session.scalar(select(WebhookEvent.id))
    assert await redis.zscore("arq:events", f"event:{event_id}") is not None
    assert await queued_message_ids(redis) == []  # never on the SMS queue


async def test_the_sms_worker_puts_its_events_on_the_events_queue(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "from": "+14155550199"},
        headers=world.auth(),
    )
    assert response.status_code == 202

    await run_worker()  # the fake provider: sent, then delivered

    assert await types(session_factory) == ["message.sent", "message.delivered"]
    async with session_factory() as session:
        ids = list(await session.scalars(select(WebhookEvent.id).order_by(WebhookEvent.seq)))
    queued = {member.decode() for member in await redis.zrange("arq:events", 0, -1)}
    assert queued == {f"event:{event_id}" for event_id in ids}


async def test_keyword_replies_belong_to_no_client_and_make_no_events(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_client_endpoint(session_factory, world.client_id)

    await twilio_inbound(api, "HELP")
    await run_worker(RecordingProvider(twilio_created))

    async with session_factory() as session:
        reply = await session.scalar(select(Message).where(Message.client_id.is_(None)))
    assert reply is not None and reply.status == "sent"
    assert await types(session_factory) == []


# ---- Inbound messages and opt-outs (to the sender's endpoint) ----


async def test_an_inbound_message_that_is_not_a_keyword_is_an_event_for_its_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_sender_endpoint(session_factory, world.twilio_sender.id)
    await set_client_endpoint(session_factory, world.client_id)

    await twilio_inbound(api, "Is my order on its way?", sid="SM" + "1" * 32)
    await twilio_inbound(api, "Is my order on its way?", sid="SM" + "1" * 32)  # a retry
    await twilio_inbound(api, "Hello", to="+14155550111")  # not one of our senders

    [(kind, url, data)] = await events(session_factory)
    assert (kind, url) == ("inbound.received", SENDER_HOOK)
    assert data["body"] == "Is my order on its way?"
    assert data["from"] == "+14155550123" and data["to"] == "+14155550100"
    assert data["sender_id"] == str(world.twilio_sender.id)
    assert data["provider_message_id"] == "SM" + "1" * 32
    async with session_factory() as session:
        event = await session.scalar(select(WebhookEvent))
    assert event is not None and event.client_id is None  # the service's: admin keys read it


async def test_stop_and_start_are_opt_out_events_not_inbound_ones(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_sender_endpoint(session_factory, world.twilio_sender.id)

    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "stop")  # no change: no event
    await twilio_inbound(api, "START")

    found = await events(session_factory)
    assert [kind for kind, _, _ in found] == ["opt_out.changed", "opt_out.changed"]
    assert [(d["opted_out"], d["action"], d["source"]) for _, _, d in found] == [
        (True, "opt_out", "keyword"),
        (False, "opt_in", "keyword"),
    ]
    assert found[0][2]["phone"] == "+14155550123"
    assert found[0][2]["sender_id"] == str(world.twilio_sender.id)
    assert found[0][2]["detail"] == "STOP to +14155550100"


async def test_a_service_wide_opt_out_is_told_to_every_senders_endpoint(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_sender_endpoint(session_factory, world.twilio_sender.id, SENDER_HOOK)
    await set_sender_endpoint(session_factory, world.vonage_sender.id, "https://93.184.215.16/")

    response = await api.put("/v1/opt-outs/+14155550123", headers=world.auth(world.admin_key))

    assert response.status_code == 200, response.text
    found = await events(session_factory)
    assert sorted(url for _, url, _ in found) == [SENDER_HOOK, "https://93.184.215.16/"]
    # Every sender's endpoint hears of it, but not which operator or client made it (other
    # clients own those senders; `GET /v1/opt-outs` hides it from them too).
    assert {(d["sender_id"], d["source"], d["actor"]) for _, _, d in found} == {(None, "api", None)}


async def test_an_opt_out_from_a_provider_error_is_an_event(
    session_factory: SessionFactory, world: World
) -> None:
    await set_sender_endpoint(session_factory, world.twilio_sender.id)
    message_id = await queued_message(session_factory, world)
    provider = RecordingProvider(twilio_error(400, 21610, "Attempt to send to unsubscribed"))

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    [(kind, _, data)] = await events(session_factory)
    assert (kind, data["source"], data["actor"]) == (
        "opt_out.changed",
        "provider_error",
        "provider:twilio",
    )
    assert len(outcome.events) == 1


async def test_sender_endpoints_are_set_by_admins(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(events=events_settings()) as api:
        path = f"/v1/senders/{world.twilio_sender.id}/event-endpoint"
        as_client = await api.put(path, json={"url": HOOK}, headers=world.auth())
        unknown = await api.put(
            f"/v1/senders/{uuid.uuid4()}/event-endpoint",
            json={"url": HOOK},
            headers=world.auth(world.admin_key),
        )
        refused = await api.put(
            path, json={"url": "https://10.0.0.8/"}, headers=world.auth(world.admin_key)
        )
        done = await api.put(path, json={"url": HOOK}, headers=world.auth(world.admin_key))
        cleared = await api.delete(path, headers=world.auth(world.admin_key))

    assert (as_client.status_code, as_client.json()["code"]) == (403, "admin_key_required")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "sender_not_found")
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "url"
    assert done.status_code == 200, done.text
    assert done.json()["sender_id"] == str(world.twilio_sender.id)
    assert done.json()["client_id"] is None and done.json()["is_default"] is True
    assert cleared.status_code == 204
    async with session_factory() as session:
        endpoint = await session.get(WebhookEndpoint, uuid.UUID(done.json()["id"]))
    assert endpoint is not None and not endpoint.is_default
