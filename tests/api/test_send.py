"""POST /v1/messages and /v1/messages/preview: validation, refusals, acceptance, queueing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from app.access.auth import create_api_key
from app.db.models import Message, MessageEvent, OptOut
from app.db.session import SessionFactory
from tests.conftest import World
from tests.queueing import queued_message_ids

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

PROBLEM = "application/problem+json"


async def send(api: httpx.AsyncClient, world: World, **body: Any) -> httpx.Response:
    body.setdefault("to", "+14155550123")
    body.setdefault("body", "Your order #1042 has shipped.")
    return await api.post("/v1/messages", json=body, headers=world.auth())


async def message_count(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


def assert_problem(
    response: httpx.Response, status: int, code: str, field: str | None = None
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["code"] == code
    if field is not None:
        assert field in [error["field"] for error in problem["errors"]], problem


async def test_accepts_a_message_stores_it_and_queues_its_id(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    response = await send(api, world, to="(415) 555-0123", metadata={"order_id": "1042"})

    assert response.status_code == 202, response.text
    message = response.json()
    assert message["status"] == "queued"
    assert message["to"] == "+14155550123"  # national format read in the default region (US)
    assert message["from"] == "+14155550100"  # the client's default sender
    assert message["encoding"] == "GSM-7"
    assert message["segments"] == 1
    assert message["metadata"] == {"order_id": "1042"}
    async with session_factory() as session:
        stored = await session.get(Message, message["id"])
        assert stored is not None and stored.status == "queued"
        events = list(await session.scalars(select(MessageEvent.status)))
        assert events == ["queued"]
    # The arq job carries only message ids.
    assert await queued_message_ids(redis) == [message["id"]]


async def test_reports_ucs2_and_segment_count(api: httpx.AsyncClient, world: World) -> None:
    response = await send(api, world, body="Ça coûte 5€ " * 7)  # 84 UCS-2 units

    assert response.status_code == 202, response.text
    assert response.json()["encoding"] == "UCS-2"
    assert response.json()["segments"] == 2


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("not a number", "not a phone number"),
        ("+1415555", "impossible number"),
        ("+999123456789", "not a phone number"),
        ("+15555550123", "invalid number"),
        ("+33142685300", "fixed-line"),
        ("+19005550123", "premium-rate"),
        ("555-0123", "impossible number"),
    ],
)
async def test_refuses_numbers_that_cannot_receive_sms(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, to: str, reason: str
) -> None:
    response = await send(api, world, to=to)

    assert_problem(response, 422, "validation_error", field="to")
    assert reason in response.json()["errors"][0]["reason"]
    assert await message_count(session_factory) == 0


async def test_refuses_a_sender_that_is_not_ours(api: httpx.AsyncClient, world: World) -> None:
    response = await send(api, world, **{"from": "+14155550111"})

    assert_problem(response, 422, "unknown_sender", field="from")


async def test_accepts_a_sender_written_in_another_format(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await send(api, world, **{"from": "+1 (415) 555-0199"})

    assert response.status_code == 202, response.text
    assert response.json()["from"] == "+14155550199"
    assert response.json()["provider"] == "fake"


async def test_requires_from_when_the_client_has_no_default_sender_and_no_pool(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:  # a client granted no sender at all
        key = await create_api_key(session, "no-senders")
    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth(key)
    )

    assert_problem(response, 422, "no_default_sender", field="from")


async def test_enforces_the_segment_limit_naming_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await send(api, world, body="a" * (153 * 10 + 1))  # 11 GSM-7 segments

    assert_problem(response, 422, "too_many_segments", field="body")
    assert "limit is 10" in response.json()["detail"]
    assert await message_count(session_factory) == 0


async def test_ten_segments_are_allowed(api: httpx.AsyncClient, world: World) -> None:
    response = await send(api, world, body="a" * (153 * 10))

    assert response.status_code == 202, response.text
    assert response.json()["segments"] == 10


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "+14155550123"}, "body"),
        ({"to": "+14155550123", "body": ""}, "body"),
        ({"body": "hi"}, "to"),
        ({"to": "+14155550123", "body": "hi", "status": "delivered"}, "status"),
        ({"to": "+14155550123", "body": "hi", "from_": "+14155550100"}, "from_"),
        ({"to": "+14155550123", "body": "hi", "validity_period": 0}, "validity_period"),
        ({"to": "+14155550123", "body": "hi", "callback_url": "not a url"}, "callback_url"),
        ({"to": "+14155550123", "body": "hi", "metadata": {"k": 1}}, "metadata.k"),
    ],
)
async def test_malformed_requests_name_the_field(
    api: httpx.AsyncClient, world: World, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/v1/messages", json=body, headers=world.auth())

    assert_problem(response, 422, "validation_error", field=field)


async def test_a_body_that_is_not_json_is_a_clear_422(api: httpx.AsyncClient, world: World) -> None:
    response = await api.post(
        "/v1/messages",
        content=b"{not json",
        headers={**world.auth(), "content-type": "application/json"},
    )

    assert_problem(response, 422, "validation_error")


async def test_refuses_a_recipient_who_opted_out_of_that_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone="+14155550123",
                sender_id=world.twilio_sender.id,
                action="opt_out",
                source="keyword",
            )
        )

    response = await send(api, world)

    assert_problem(response, 403, "recipient_opted_out")
    assert await message_count(session_factory) == 0
    assert await queued_message_ids(redis) == []
    # Another sender is not affected by an opt-out from this one.
    other = await send(api, world, **{"from": "+14155550199"})
    assert other.status_code == 202, other.text


async def test_a_service_wide_opt_out_applies_to_every_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        session.add(OptOut(phone="+14155550123", sender_id=None, action="opt_out", source="api"))

    response = await send(api, world, **{"from": "+14155550199"})

    assert_problem(response, 403, "recipient_opted_out")


async def test_an_opt_in_after_the_opt_out_allows_sending_again(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone="+14155550123",
                sender_id=world.twilio_sender.id,
                action="opt_out",
                source="keyword",
            )
        )
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone="+14155550123",
                sender_id=world.twilio_sender.id,
                action="opt_in",
                source="keyword",
            )
        )

    response = await send(api, world)

    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk_not-a-real-key"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ],
)
async def test_requires_a_valid_api_key(
    api: httpx.AsyncClient, world: World, headers: dict[str, str], code: str
) -> None:
    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=headers
    )

    assert_problem(response, 401, code)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_accepts_even_when_redis_is_down(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(redis_url="redis://127.0.0.1:1/0") as api:
        response = await send(api, world)

    assert response.status_code == 202, response.text
    async with session_factory() as session:
        stored = await session.get(Message, response.json()["id"])
        assert stored is not None and stored.status == "queued"


async def test_preview_reports_the_characters_that_forced_ucs2(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await api.post(
        "/v1/messages/preview", json={"body": "Ça coûte 5€, ça?"}, headers=world.auth()
    )

    assert response.status_code == 200, response.text
    assert response.json() == {
        "encoding": "UCS-2",
        "segments": 1,
        "units": 16,
        "non_gsm_characters": ["û", "ç"],
        "max_segments": 10,
        "within_limit": True,
    }
    assert await message_count(session_factory) == 0


async def test_preview_says_when_a_body_is_over_the_limit(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.post(
        "/v1/messages/preview", json={"body": "€" * 800}, headers=world.auth()
    )

    assert response.json()["segments"] == 11  # 1600 septets / 153 per segment
    assert response.json()["within_limit"] is False
