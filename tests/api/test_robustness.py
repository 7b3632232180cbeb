"""Bad input of every shape gets a clear problem+json, never a 500; the edges of the plumbing."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from app.db.models import Message
from app.db.session import ENQUEUE_AFTER_COMMIT, SessionFactory
from app.main import create_app
from app.web.deps import get_session
from app.worker.queue import DeliveryBatcher, close_queue, create_queue
from app.worker.tasks import WorkerSettings, sweep
from tests.api.test_send import assert_problem
from tests.api.test_status_callbacks import SID, twilio_signature
from tests.conftest import PUBLIC_BASE_URL, TEST_REDIS_URL, World, make_settings
from tests.domain.test_delivery import load, queued_message
from tests.queueing import queued_message_ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"body": "hi\x00there"}, "body"),
        ({"body": "hi", "metadata": {"order": "10\x0042"}}, "metadata.order"),
        ({"body": "hi", "from": "+1415555\x000100"}, "from"),
        ({"body": "hi", "validity_period": True}, "validity_period"),
        ({"body": "hi", "validity_period": "60"}, "validity_period"),
    ],
)
async def test_values_no_column_can_hold_are_refused_by_field(
    api: httpx.AsyncClient, world: World, body: dict[str, Any], field: str
) -> None:
    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", **body}, headers=world.auth()
    )

    assert_problem(response, 422, "validation_error", field=field)


async def test_a_nul_in_a_sender_description_is_refused(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.post(
        "/v1/senders",
        json={
            "address": "NULTEST",
            "kind": "alphanumeric",
            "provider": "fake",
            "description": "a\x00b",
        },
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="description")


async def test_an_oversized_body_is_refused_before_it_is_read(
    app_factory: Any, world: World
) -> None:
    async with app_factory(max_request_bytes=2048) as api:
        declared = await api.post(
            "/v1/messages",
            content=b"{" + b" " * 4096 + b"}",
            headers={**world.auth(), "content-type": "application/json"},
        )

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1024

        streamed = await api.post(
            "/v1/opt-outs/import",
            content=chunks(),
            headers={**world.auth(world.admin_key), "content-type": "text/csv"},
        )

    assert_problem(declared, 413, "request_too_large")
    assert_problem(streamed, 413, "request_too_large")


async def test_deeply_nested_json_on_a_webhook_is_a_4xx(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/v1/webhooks/vonage/status",
        content=b"[" * 100_000,
        headers={"content-type": "application/json"},
    )

    assert_problem(response, 422, "invalid_callback")


async def test_unknown_paths_and_methods_are_problems_too(api: httpx.AsyncClient) -> None:
    missing = await api.get("/v1/nothing-here")
    wrong_method = await api.delete("/v1/messages")

    assert_problem(missing, 404, "not_found")
    assert_problem(wrong_method, 405, "method_not_allowed")
    assert "allow" in wrong_method.headers


async def test_twilio_signatures_are_checked_against_the_public_url_not_the_host_header(
    database: str, redis: Redis, world: World, session_factory: SessionFactory
) -> None:
    # Behind a proxy the app sees its internal address; Twilio signed the public one.
    message_id = await queued_message(
        session_factory, world, status="sent", provider_message_id=SID
    )
    path = f"/v1/webhooks/twilio/status?message_id={message_id}"
    params = {"MessageSid": SID, "MessageStatus": "delivered"}
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://internal:8000") as api:
            internal = await api.post(
                path,
                data=params,
                headers={
                    "X-Twilio-Signature": twilio_signature("http://internal:8000" + path, params)
                },
            )
            public = await api.post(
                path,
                data=params,
                headers={"X-Twilio-Signature": twilio_signature(PUBLIC_BASE_URL + path, params)},
            )

    assert_problem(internal, 403, "invalid_signature")
    assert public.status_code == 204
    assert (await load(session_factory, message_id)).status == "delivered"


async def test_jobs_are_enqueued_only_after_the_commit(
    session_factory: SessionFactory, redis: Redis, world: World
) -> None:
    queue = create_queue(TEST_REDIS_URL)
    state = SimpleNamespace(
        session_factory=session_factory, queue=queue, delivery_batcher=DeliveryBatcher(queue)
    )
    request: Any = SimpleNamespace(app=SimpleNamespace(state=state))
    committed_id, rolled_back_id = uuid.uuid4(), uuid.uuid4()
    try:
        failing = get_session(request)
        session = await anext(failing)
        session.info[ENQUEUE_AFTER_COMMIT] = [rolled_back_id]
        with pytest.raises(RuntimeError):
            await failing.athrow(RuntimeError("the endpoint failed"))

        succeeding = get_session(request)
        session = await anext(succeeding)
        session.info[ENQUEUE_AFTER_COMMIT] = [committed_id]
        with pytest.raises(StopAsyncIteration):
            await anext(succeeding)
    finally:
        await close_queue(queue)

    assert await queued_message_ids(redis) == [str(committed_id)]


async def test_the_sweep_is_scheduled_every_ten_seconds_on_the_worker() -> None:
    (job,) = [job for job in WorkerSettings.cron_jobs if job.coroutine is sweep]

    assert job.second == set(range(0, 60, 10))
    assert job.run_at_startup is True


async def test_a_status_report_with_oversized_fields_is_recorded_not_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await queued_message(
        session_factory, world, status="sent", provider_message_id=SID
    )
    path = f"/v1/webhooks/twilio/status?message_id={message_id}"
    params = {
        "MessageSid": SID,
        "MessageStatus": "failed",
        "ErrorCode": "9" * 80,
        "ErrorMessage": "bad\x00byte",
    }

    response = await api.post(
        path,
        data=params,
        headers={"X-Twilio-Signature": twilio_signature(PUBLIC_BASE_URL + path, params)},
    )

    assert response.status_code == 204, response.text
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("failed", "9" * 32)
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 1
