"""Idempotency-Key on POST /v1/messages: replay, mismatch, in flight, scope, expiry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update

from app.db.models import IdempotencyKey, Message
from app.db.session import SessionFactory
from app.sending.idempotency import lock_id
from tests.api.test_send import assert_problem
from tests.conftest import World
from tests.queueing import queued_message_ids

BODY = {"to": "+14155550123", "body": "Your code is 123456"}


async def post(
    api: httpx.AsyncClient,
    world: World,
    key: str,
    body: dict[str, Any] | None = None,
    api_key: str | None = None,
) -> httpx.Response:
    return await api.post(
        "/v1/messages",
        json=body or BODY,
        headers={**world.auth(api_key), "Idempotency-Key": key},
    )


async def count_messages(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


async def test_a_retry_with_the_same_key_and_body_replays_and_sends_nothing_new(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    first = await post(api, world, "order-1042-shipped")
    # The same JSON value with its keys in another order is the same request.
    second = await post(api, world, "order-1042-shipped", dict(reversed(list(BODY.items()))))

    assert first.status_code == 202, first.text
    assert second.status_code == 202, second.text
    assert second.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert await count_messages(session_factory) == 1
    assert len(await queued_message_ids(redis)) == 1  # queued for delivery once


async def test_the_same_key_with_a_different_body_is_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await post(api, world, "k1")

    response = await post(api, world, "k1", {**BODY, "body": "Your code is 654321"})

    assert_problem(response, 422, "idempotency_key_reused", field="Idempotency-Key")
    assert await count_messages(session_factory) == 1


async def test_a_key_still_in_flight_gets_409(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Hold the key's lock as the first request's transaction would while it is running.
    async with session_factory() as holder, holder.begin():
        await holder.execute(
            select(func.pg_advisory_xact_lock(lock_id(world.client_id, "busy-key")))
        )
        response = await post(api, world, "busy-key")

    assert_problem(response, 409, "idempotency_key_in_use")
    assert response.headers["retry-after"] == "1"
    assert await count_messages(session_factory) == 0
    # Once the first request is over, the key is usable.
    assert (await post(api, world, "busy-key")).status_code == 202


async def test_concurrent_requests_with_one_key_send_one_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    responses = await asyncio.gather(*(post(api, world, "race") for _ in range(8)))

    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {202, 409}
    assert 202 in statuses
    ids = {response.json()["id"] for response in responses if response.status_code == 202}
    assert len(ids) == 1
    assert await count_messages(session_factory) == 1


async def test_keys_are_scoped_per_client(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    mine = await post(api, world, "shared-key")
    theirs = await post(
        api, world, "shared-key", {**BODY, "from": "+14155550199"}, api_key=world.other_client_key
    )

    assert mine.status_code == 202, mine.text
    assert theirs.status_code == 202, theirs.text
    assert mine.json()["id"] != theirs.json()["id"]
    assert await count_messages(session_factory) == 2


async def test_a_refused_request_stores_nothing_so_a_corrected_retry_goes_through(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    refused = await post(api, world, "fix-me", {**BODY, "from": "+14155550111"})
    assert_problem(refused, 422, "unknown_sender", field="from")

    retried = await post(api, world, "fix-me", {**BODY, "from": "+14155550111"})
    assert_problem(retried, 422, "unknown_sender", field="from")
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


async def test_keys_are_kept_for_24_hours_and_then_forgotten(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    first = await post(api, world, "daily")
    async with session_factory.begin() as session:
        await session.execute(
            update(IdempotencyKey).values(created_at=datetime.now(UTC) - timedelta(hours=23))
        )
    assert (await post(api, world, "daily")).json()["id"] == first.json()["id"]

    async with session_factory.begin() as session:
        await session.execute(
            update(IdempotencyKey).values(created_at=datetime.now(UTC) - timedelta(hours=25))
        )
    later = await post(api, world, "daily")

    assert later.status_code == 202
    assert later.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in later.headers
    assert await count_messages(session_factory) == 2


async def test_an_overlong_key_is_refused(api: httpx.AsyncClient, world: World) -> None:
    response = await post(api, world, "k" * 256)

    assert_problem(response, 422, "invalid_idempotency_key", field="Idempotency-Key")


async def test_the_stored_response_is_the_one_that_was_committed(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await post(api, world, "stored")

    async with session_factory() as session:
        row = (
            await session.execute(
                text("SELECT response_status, response_body->>'id' FROM idempotency_keys")
            )
        ).one()
    assert row == (202, response.json()["id"])
