"""Scheduled sends, cancelling and quiet hours, through the HTTP API on PostgreSQL and Redis
(the worker restart and Redis loss: tests/worker/test_scheduled_restart.py)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver_message
from app.delivery.transitions import promote_scheduled
from app.kernel.quiet_hours import QuietHours, zones_for
from tests.conftest import World
from tests.domain.test_delivery import POLICY, RecordingProvider, load, twilio_created
from tests.queueing import ready_ids

TO = "+14155550123"  # America/Los_Angeles


def ahead(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def send(api: httpx.AsyncClient, world: World, **body: Any) -> httpx.Response:
    return await api.post(
        "/v1/messages",
        json={"to": TO, "body": "Your order has shipped.", **body},
        headers=world.auth(),
    )


async def scheduled(api: httpx.AsyncClient, world: World, **body: Any) -> dict[str, Any]:
    response = await send(api, world, send_at=ahead(3600), **body)
    assert response.status_code == 202, response.text
    message: dict[str, Any] = response.json()
    assert message["status"] == "scheduled"
    return message


async def make_due(session_factory: SessionFactory, message_id: str) -> None:
    """As if its send_at had come (the database's clock)."""
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(message_id))
            .values(send_at=func.now() - timedelta(seconds=1))
        )


@pytest.mark.parametrize(
    ("send_at", "reason"),
    [
        (lambda: ahead(30), "at least 60 seconds"),
        (lambda: ahead(36 * 86400), "at most 35 days"),
        (lambda: (datetime.now() + timedelta(hours=1)).isoformat(), "timezone"),
        (lambda: 1893456000, "RFC 3339"),
        (lambda: "tomorrow at noon", "datetime"),
    ],
)
async def test_a_send_at_out_of_bounds_or_without_offset_is_a_422_naming_the_field(
    api: httpx.AsyncClient, world: World, redis: Redis, send_at: Any, reason: str
) -> None:
    response = await send(api, world, send_at=send_at())
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == ["send_at"]
    assert reason in problem["errors"][0]["reason"]
    listed = await api.get("/v1/messages", headers=world.auth())
    assert listed.json()["data"] == []


async def test_a_scheduled_message_is_stored_scheduled_off_the_queue_with_validity_from_send_at(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    send_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    response = await send(
        api,
        world,
        send_at=send_at.astimezone(ZoneInfo("Europe/Paris")).isoformat(),
        validity_period=600,
    )
    assert response.status_code == 202, response.text
    message = response.json()
    assert message["status"] == "scheduled"
    assert datetime.fromisoformat(message["send_at"]) == send_at
    assert datetime.fromisoformat(message["expires_at"]) == send_at + timedelta(seconds=600)
    assert await ready_ids(redis) == []  # on no queue: PostgreSQL holds it

    detail = (await api.get(f"/v1/messages/{message['id']}", headers=world.auth())).json()
    assert [step["status"] for step in detail["history"]] == ["scheduled"]
    assert detail["status"] == "scheduled"


async def test_a_due_message_is_promoted_once_and_fed_to_delivery_not_before(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    later = await scheduled(api, world)
    due = await scheduled(api, world)
    await make_due(session_factory, due["id"])

    promoted = await asyncio.gather(*(promote_scheduled(session_factory, 10) for _ in range(4)))
    # Four schedulers at once: the due message is promoted by exactly one, the other not at all.
    assert sorted(len(ids) for ids in promoted) == [0, 0, 0, 1]
    assert [str(i) for ids in promoted for i in ids] == [due["id"]]
    assert (await load(session_factory, uuid.UUID(due["id"]))).status == "queued"
    assert (await load(session_factory, uuid.UUID(later["id"]))).status == "scheduled"

    twilio = RecordingProvider(twilio_created)
    outcome = await deliver_message(
        uuid.UUID(due["id"]), session_factory, twilio.providers(), POLICY
    )
    assert outcome.status is not None and outcome.status.value == "sent"
    assert len(twilio.requests) == 1
    history = (await api.get(f"/v1/messages/{due['id']}", headers=world.auth())).json()["history"]
    assert [(s["status"], s["source"]) for s in history][:3] == [
        ("scheduled", "api"),
        ("queued", "scheduler"),
        ("sending", "worker"),
    ]


async def test_an_opt_out_recorded_while_scheduled_cancels_it_at_send_time(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    message = await scheduled(api, world)
    stop = await api.put(f"/v1/opt-outs/{TO}", headers=world.auth())
    assert stop.status_code in (200, 201), stop.text
    await make_due(session_factory, message["id"])
    assert await promote_scheduled(session_factory, 10) == [uuid.UUID(message["id"])]

    twilio = RecordingProvider(twilio_created)
    await deliver_message(uuid.UUID(message["id"]), session_factory, twilio.providers(), POLICY)
    assert twilio.requests == []
    stored = await load(session_factory, uuid.UUID(message["id"]))
    assert (stored.status, stored.error_code) == ("canceled", "recipient_opted_out")


async def test_an_expired_scheduled_message_is_not_sent(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    message = await scheduled(api, world, validity_period=60)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(message["id"]))
            .values(send_at=func.now() - timedelta(seconds=120), expires_at=func.now())
        )
    await promote_scheduled(session_factory, 10)
    twilio = RecordingProvider(twilio_created)
    await deliver_message(uuid.UUID(message["id"]), session_factory, twilio.providers(), POLICY)
    assert twilio.requests == []
    assert (await load(session_factory, uuid.UUID(message["id"]))).status == "expired"


async def test_a_batch_schedules_items_with_send_at_and_judges_each_send_at(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    response = await api.post(
        "/v1/messages/batch",
        json={
            "messages": [
                {"to": TO, "body": "later", "send_at": ahead(600)},
                {"to": "+14155550124", "body": "now"},
                {"to": "+14155550125", "body": "too soon", "send_at": ahead(5)},
            ]
        },
        headers=world.auth(),
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data[0]["message"]["status"] == "scheduled"
    assert data[1]["message"]["status"] == "queued"
    assert data[2]["status"] == "rejected"
    assert data[2]["error"]["errors"][0]["field"] == "send_at"
    # Only the immediate one is handed to the workers.
    assert await ready_ids(redis) == [data[1]["message"]["id"]]


# ---- Cancelling ------------------------------------------------------------------------------


async def cancel(api: httpx.AsyncClient, message_id: str, key: str) -> httpx.Response:
    return await api.post(
        f"/v1/messages/{message_id}/cancel", headers={"Authorization": f"Bearer {key}"}
    )


async def test_cancel_a_scheduled_message_is_idempotent_and_it_is_never_promoted(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    message = await scheduled(api, world)
    first = await cancel(api, message["id"], world.client_key)
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["error_code"]) == ("canceled", "canceled")
    again = await cancel(api, message["id"], world.client_key)
    assert again.status_code == 200
    assert again.json()["status"] == "canceled"

    await make_due(session_factory, message["id"])
    assert await promote_scheduled(session_factory, 10) == []
    async with session_factory() as session:
        steps = list(
            await session.scalars(
                select(MessageEvent.status)
                .where(MessageEvent.message_id == uuid.UUID(message["id"]), MessageEvent.applied)
                .order_by(MessageEvent.id)
            )
        )
    assert steps == ["scheduled", "canceled"]  # the second cancel changed nothing


async def test_cancel_a_queued_message_and_whose_messages_may_be_canceled(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    queued = await send(api, world)
    assert queued.json()["status"] == "queued"
    other = await cancel(api, queued.json()["id"], world.other_client_key)
    assert other.status_code == 404
    assert other.json()["code"] == "message_not_found"
    by_admin = await cancel(api, queued.json()["id"], world.admin_key)
    assert by_admin.status_code == 200, by_admin.text
    assert by_admin.json()["status"] == "canceled"
    missing = await cancel(api, str(uuid.uuid4()), world.client_key)
    assert missing.status_code == 404


async def test_cancel_a_sent_message_is_a_409_naming_its_status(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    message = (await send(api, world)).json()
    twilio = RecordingProvider(twilio_created)
    await deliver_message(uuid.UUID(message["id"]), session_factory, twilio.providers(), POLICY)
    response = await cancel(api, message["id"], world.client_key)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "already_sent"
    assert (await load(session_factory, uuid.UUID(message["id"]))).status == "sent"


async def test_a_cancel_racing_a_claim_has_exactly_one_winner(
    api: httpx.AsyncClient, world: World, redis: Redis, session_factory: SessionFactory
) -> None:
    twilio = RecordingProvider(twilio_created)
    providers = twilio.providers()
    outcomes = []
    for round_ in range(40):
        response = await send(api, world, body=f"race {round_}")
        message_id = response.json()["id"]

        async def cancel_later(message_id: str) -> httpx.Response:
            await asyncio.sleep(random.uniform(0, 0.01))
            return await cancel(api, message_id, world.client_key)

        async def claim_later(message_id: str) -> None:
            await asyncio.sleep(random.uniform(0, 0.01))
            await deliver_message(uuid.UUID(message_id), session_factory, providers, POLICY)

        answer, _ = await asyncio.gather(cancel_later(message_id), claim_later(message_id))
        submitted = [r for r in twilio.requests if f"race+{round_}".encode() in r.content]
        stored = await load(session_factory, uuid.UUID(message_id))
        if answer.status_code == 200:
            # The cancel won: never handed to the provider.
            assert (stored.status, submitted) == ("canceled", []), round_
            outcomes.append("canceled")
        else:
            assert answer.status_code == 409, answer.text
            assert answer.json()["code"] in ("already_sending", "already_sent")
            assert stored.status == "sent" and len(submitted) == 1, round_
            outcomes.append("sent")
    # Both orders happened (else the race was not run).
    assert set(outcomes) == {"canceled", "sent"}, outcomes


# ---- Quiet hours -----------------------------------------------------------------------------


def window_around_now(zone: str) -> tuple[time, time, datetime]:
    """A window that the local time in `zone` is inside now, and its end as an instant."""
    local = datetime.now(ZoneInfo(zone))
    start = (local - timedelta(hours=1)).time().replace(second=0, microsecond=0)
    end_at = (local + timedelta(hours=2)).replace(second=0, microsecond=0)
    return start, end_at.time(), end_at


async def set_quiet_hours(api: httpx.AsyncClient, world: World, start: time, end: time) -> None:
    response = await api.put(
        "/v1/clients/shop/quiet-hours",
        json={"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")},
        headers=world.auth(world.admin_key),
    )
    assert response.status_code == 200, response.text


async def test_quiet_hours_delay_a_message_that_respects_them_and_no_other(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    start, end, end_at = window_around_now("America/Los_Angeles")
    await set_quiet_hours(api, world, start, end)

    waiting = await send(api, world, respect_quiet_hours=True)
    assert waiting.status_code == 202, waiting.text
    assert waiting.json()["status"] == "scheduled"
    assert datetime.fromisoformat(waiting.json()["send_at"]) == end_at

    urgent = await send(api, world)  # no flag: never delayed
    assert urgent.json()["status"] == "queued"
    assert urgent.json()["send_at"] is None
    assert await ready_ids(redis) == [urgent.json()["id"]]

    # Outside the window (here: to a number whose local time is not in it) it goes at once.
    paris = await api.post(
        "/v1/messages",
        json={"to": "+33612345678", "body": "Bonjour", "respect_quiet_hours": True},
        headers=world.auth(),
    )
    paris_time = datetime.now(ZoneInfo("Europe/Paris")).time().replace(tzinfo=None)
    expected = "scheduled" if QuietHours(start, end).inside(paris_time) else "queued"
    assert paris.json()["status"] == expected


async def test_without_quiet_hours_set_the_flag_changes_nothing_and_only_admins_set_them(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    assert (await send(api, world, respect_quiet_hours=True)).json()["status"] == "queued"
    refused = await api.put(
        "/v1/clients/shop/quiet-hours",
        json={"start": "21:00", "end": "08:00"},
        headers=world.auth(),
    )
    assert refused.status_code == 403
    empty = await api.put(
        "/v1/clients/shop/quiet-hours",
        json={"start": "21:00", "end": "21:00"},
        headers=world.auth(world.admin_key),
    )
    assert empty.status_code == 422
    unknown = await api.put(
        "/v1/clients/nobody/quiet-hours",
        json={"start": "21:00", "end": "08:00"},
        headers=world.auth(world.admin_key),
    )
    assert unknown.status_code == 404

    start, end, _ = window_around_now("America/Los_Angeles")
    await set_quiet_hours(api, world, start, end)
    assert (await send(api, world, respect_quiet_hours=True)).json()["status"] == "scheduled"
    read = await api.get("/v1/clients/shop/quiet-hours", headers=world.auth(world.admin_key))
    assert read.json()["start"] == start.strftime("%H:%M:%S")
    deleted = await api.delete("/v1/clients/shop/quiet-hours", headers=world.auth(world.admin_key))
    assert deleted.status_code == 204
    assert (await send(api, world, respect_quiet_hours=True)).json()["status"] == "queued"


async def test_quiet_hours_apply_at_the_send_at_when_both_are_given(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    # A window around the send_at's local time (in 6 hours), not around now.
    send_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=6)
    local = send_at.astimezone(ZoneInfo("America/Los_Angeles"))
    start = (local - timedelta(minutes=30)).time().replace(second=0)
    end_at = (local + timedelta(minutes=90)).replace(second=0)
    await set_quiet_hours(api, world, start, end_at.time())
    response = await send(api, world, send_at=send_at.isoformat(), respect_quiet_hours=True)
    assert response.status_code == 202, response.text
    assert datetime.fromisoformat(response.json()["send_at"]) == end_at


def test_a_number_with_several_zones_waits_until_it_is_outside_the_window_in_every_zone() -> None:
    toll_free = "+18005550123"
    zones = zones_for(toll_free)
    assert len(zones) > 10
    at = datetime(2026, 12, 5, 5, 30, tzinfo=UTC)  # 21:30 in Los Angeles, 00:30 in New York
    window = QuietHours(time(21, 0), time(8, 0))
    release = window.release(toll_free, at)
    assert release is not None
    # Los Angeles's 08:00 (16:00 UTC) is 06:00 in Guam: the message waits for 08:00 there.
    assert release == datetime(2026, 12, 5, 22, 0, tzinfo=UTC)
    assert all(window.end_after(release, zone) is None for zone in zones)
    assert window.release("+14155550123", datetime(2026, 12, 5, 20, 0, tzinfo=UTC)) is None
