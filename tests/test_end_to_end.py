"""The whole send path: API -> PostgreSQL -> Redis -> a real arq worker (burst) -> provider faked
at the HTTP boundary -> signed status callback -> delivered."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from arq.connections import RedisSettings
from arq.worker import Worker
from redis.asyncio import Redis
from sqlalchemy import update

from app.db.models import Message
from app.db.session import SessionFactory
from app.worker.queue import create_queue, enqueue_deliveries
from app.worker.tasks import WorkerSettings, sweep
from tests.api.test_status_callbacks import twilio_callback
from tests.conftest import TEST_REDIS_URL, World, make_settings
from tests.domain.test_delivery import RecordingProvider, load, twilio_created, twilio_error
from tests.queueing import queued_message_ids, ready_length

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard


async def run_worker(provider: RecordingProvider | None = None, **settings: Any) -> None:
    """Run real arq workers in burst mode until nothing waits for delivery: neither on the
    delivery feed's list nor on the queue (deferred jobs included). A burst worker stops when
    its queue is empty, and its feed's deliveries may queue retries: so run again until both
    are empty (each run delivers what it found)."""
    for _ in range(50):
        ctx: dict[str, Any] = {"settings": make_settings(**settings)}
        if provider is not None:
            ctx["http"] = httpx.AsyncClient(transport=httpx.MockTransport(provider))
        worker = Worker(
            functions=WorkerSettings.functions,
            on_startup=WorkerSettings.on_startup,
            on_shutdown=WorkerSettings.on_shutdown,
            redis_settings=RedisSettings.from_dsn(TEST_REDIS_URL),
            burst=True,
            poll_delay=0.01,
            handle_signals=False,
            keep_result=WorkerSettings.keep_result,
            max_tries=WorkerSettings.max_tries,
            job_timeout=WorkerSettings.job_timeout,
            ctx=ctx,
        )
        try:
            await worker.main()
        finally:
            await worker.close()
        if not await _waiting_for_delivery():
            return
    raise AssertionError("messages still wait for delivery after 50 burst runs")


async def _waiting_for_delivery() -> bool:
    redis = Redis.from_url(TEST_REDIS_URL)
    try:
        return bool(await ready_length(redis) or await redis.zcard("arq:queue"))
    finally:
        await redis.aclose()


async def post_message(api: httpx.AsyncClient, world: World, **body: Any) -> dict[str, Any]:
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "Your order #1042 has shipped.", **body},
        headers=world.auth(),
    )
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_twilio_message_from_api_to_delivered(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    provider = RecordingProvider(twilio_created)
    accepted = await post_message(api, world)

    await run_worker(provider)

    assert len(provider.requests) == 1
    request = provider.requests[0]
    assert request.url.path.endswith("/Messages.json")
    assert parse_qs(request.content.decode())["Body"] == ["Your order #1042 has shipped."]
    sent = await api.get(f"/v1/messages/{accepted['id']}", headers=world.auth())
    assert sent.json()["status"] == "sent"

    callback = await twilio_callback(api, accepted["id"], "delivered")

    assert callback.status_code == 204
    final = (await api.get(f"/v1/messages/{accepted['id']}", headers=world.auth())).json()
    assert final["status"] == "delivered"
    assert final["provider_message_id"] == "SM" + "ab" * 16
    assert [step["status"] for step in final["history"]] == [
        "queued",
        "sending",
        "sent",
        "delivered",
    ]


async def test_fake_provider_reports_delivery_through_the_status_path(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    accepted = await post_message(api, world, **{"from": "+14155550199"})

    await run_worker()

    final = (await api.get(f"/v1/messages/{accepted['id']}", headers=world.auth())).json()
    assert final["status"] == "delivered"
    assert final["provider_message_id"].startswith("fake-")
    assert [(s["status"], s["source"]) for s in final["history"]] == [
        ("queued", "api"),
        ("sending", "worker"),
        ("sent", "worker"),
        ("delivered", "fake"),
    ]


async def test_a_5xx_is_retried_by_the_worker_until_it_succeeds(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    failing = twilio_error(503, 20503, "Service Unavailable")
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return failing(request) if calls <= 2 else twilio_created(request)

    provider = RecordingProvider(flaky)
    accepted = await post_message(api, world)

    await run_worker(provider)

    message = await load(session_factory, uuid.UUID(accepted["id"]))
    assert (message.status, message.attempts) == ("sent", 3)
    assert len(provider.requests) == 3


async def test_a_message_accepted_while_redis_was_down_is_swept_and_delivered(
    app_factory: Any, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    async with app_factory(redis_url="redis://127.0.0.1:1/0") as down_api:
        accepted = await post_message(down_api, world)
    assert await queued_message_ids(redis) == []
    # The sweep leaves recent messages to their own job; this one is past the grace period.
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(next_attempt_at=datetime.now(UTC) - timedelta(minutes=5))
        )
    queue = create_queue(TEST_REDIS_URL)
    ctx = {
        "settings": make_settings(),
        "session_factory": session_factory,
        "redis": queue,
    }
    try:
        assert await sweep(ctx) == 1
    finally:
        await queue.aclose(close_connection_pool=True)
    provider = RecordingProvider(twilio_created)

    await run_worker(provider)

    assert len(provider.requests) == 1
    assert (await load(session_factory, uuid.UUID(accepted["id"]))).status == "sent"


async def test_a_duplicate_job_for_a_sent_message_sends_nothing(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    provider = RecordingProvider(twilio_created)
    accepted = await post_message(api, world)
    await run_worker(provider)

    queue = create_queue(TEST_REDIS_URL)
    try:
        assert await enqueue_deliveries(queue, [uuid.UUID(accepted["id"])]) == 1
    finally:
        await queue.aclose(close_connection_pool=True)
    await run_worker(provider)

    assert len(provider.requests) == 1


async def test_enqueueing_a_message_twice_queues_one_job(
    world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    message_id = uuid.uuid4()
    queue = create_queue(TEST_REDIS_URL)
    try:
        queued = [await enqueue_deliveries(queue, [message_id]) for _ in range(3)]
    finally:
        await queue.aclose(close_connection_pool=True)

    assert queued == [1, 0, 0]
    assert await redis.zcard("arq:queue") == 1
