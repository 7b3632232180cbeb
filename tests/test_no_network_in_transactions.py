"""No network I/O inside a database transaction, anywhere: the guard (tests/netguard.py) fails a
test when the service makes a DNS lookup, a Redis call or an HTTP call while its task has a
transaction open. Here: the guard catches each kind on every road a transaction is opened by,
and the end-to-end paths run under it (send and batch with callback URLs to resolve, delivery
jobs, status callbacks, inbound keywords with their replies, endpoints, event delivery, the
sweeps). The modules of those paths' own tests are marked `network_guard` too; NETWORK_GUARD=1
runs the whole suite under it."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.pg import Database
from app.db.session import SessionFactory, Tx
from app.delivery.transitions import run_raw_transaction, run_transaction
from app.events import destinations
from app.kernel.settings import EventsSettings
from tests.conftest import TEST_REDIS_URL, World, make_settings, owned_database_url
from tests.netguard import NetworkGuard

PUBLIC = "93.184.215.14"  # what hooks.example.test resolves to here (a public address)


@pytest.fixture
def public_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """hooks.example.test resolves (through the service's real resolver road) to a public
    address; the names looked up are listed."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            looked_up.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port or 443))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


async def resolve() -> None:
    await destinations.resolve_destination(
        "https://hooks.example.test/sms", EventsSettings(allow_http=False)
    )


async def test_the_guard_sees_each_kind_of_call_on_each_road(
    network_guard: NetworkGuard, session_factory: SessionFactory, public_dns: list[str]
) -> None:
    redis = Redis.from_url(TEST_REDIS_URL)
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(204)))
    database = Database(owned_database_url(), size=1)

    async def calls() -> None:
        await resolve()
        await redis.get("smsgate:guard")
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get("smsgate:guard")
            await pipe.execute()
        await http.get("https://hooks.example.test/")

    async def orm_work(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        await calls()

    async def raw_work(tx: Tx) -> None:
        await tx.fetch("SELECT 1")
        await calls()

    try:
        await calls()  # outside a transaction: fine
        assert network_guard.violations == []
        await run_transaction(session_factory, orm_work)
        orm = list(network_guard.violations)
        await run_raw_transaction(session_factory, raw_work)
        raw = network_guard.violations[len(orm) :]
        async with database.transaction() as connection:
            await connection.fetch("SELECT 1")
            await calls()
        pooled = network_guard.violations[len(orm) + len(raw) :]
        await calls()  # after the commits: fine again
    finally:
        await database.close()
        await http.aclose()
        await redis.aclose()

    for found in (orm, raw, pooled):
        kinds = [v.split(" while ")[0] for v in found]
        assert kinds == [
            "DNS lookup of hooks.example.test",
            "Redis command GET",
            "Redis pipeline of 1 commands",
            "HTTP request GET https://hooks.example.test/",
        ]
    assert len(network_guard.violations) == 12
    assert public_dns == ["hooks.example.test"] * 5
    network_guard.violations.clear()  # seen: the point of this test


async def test_the_guard_sees_calls_of_child_tasks_inside_the_parents_transaction(
    network_guard: NetworkGuard, session_factory: SessionFactory, redis: Redis
) -> None:
    """Found by review: open transactions were keyed by task, and `asyncio.wait_for` (a task of
    its own on Python 3.11), `gather` and `create_task` run the call in a child task."""
    started = asyncio.Event()
    go_on = asyncio.Event()

    async def earlier() -> None:  # started before the transaction: not its work
        started.set()
        await go_on.wait()
        await redis.get("smsgate:guard:earlier")

    background = asyncio.create_task(earlier())
    await started.wait()

    async def get(key: str) -> object:
        return await redis.get(key)

    async def work(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        go_on.set()
        await background
        await asyncio.wait_for(redis.get("smsgate:guard:wait_for"), timeout=5)
        await asyncio.gather(redis.get("smsgate:guard:gather"))
        await asyncio.create_task(get("smsgate:guard:task"))

    await run_transaction(session_factory, work)
    after = asyncio.create_task(get("smsgate:guard:after"))  # the transaction has ended
    await after
    await asyncio.gather(redis.get("smsgate:guard:after"))

    kinds = [v.split(" while ")[0] for v in network_guard.violations]
    assert kinds == ["Redis command GET"] * 3, network_guard.violations
    assert all("run_transaction" in v or "transitions.py" in v for v in network_guard.violations)
    network_guard.violations.clear()  # seen: the point of this test


async def test_a_tests_own_transaction_is_not_the_services(
    network_guard: NetworkGuard, session_factory: SessionFactory, redis: Redis
) -> None:
    before = network_guard.checked
    async with session_factory() as session:
        await session.execute(text("SELECT 1"))
        await redis.get("smsgate:guard")
    assert network_guard.violations == [] and network_guard.checked == before + 1


@pytest.mark.network_guard
async def test_sends_and_batches_with_callback_urls_resolve_before_any_transaction(
    api: httpx.AsyncClient, world: World, public_dns: list[str], network_guard: NetworkGuard
) -> None:
    hook = "https://hooks.example.test/status"
    single = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "Hi", "callback_url": hook},
        headers=world.auth(),
    )
    batch = await api.post(
        "/v1/messages/batch",
        json={
            "messages": [
                {"to": f"+1415555{n:04d}", "body": "Hi", "callback_url": f"{hook}/{n}"}
                for n in range(20)
            ]
        },
        headers=world.auth(),
    )
    endpoint = await api.put(
        "/v1/event-endpoints/default", json={"url": hook}, headers=world.auth()
    )
    sender_endpoint = await api.put(
        f"/v1/senders/{world.fake_sender.id}/event-endpoint",
        json={"url": f"{hook}/inbound"},
        headers=world.auth(world.admin_key),
    )

    assert single.status_code == 202, single.text
    assert batch.status_code in (200, 202, 207), batch.text
    assert endpoint.status_code in (200, 201), endpoint.text
    assert sender_endpoint.status_code in (200, 201), sender_endpoint.text
    assert len(public_dns) >= 4  # each was really resolved, under the guard
    assert network_guard.checked > 0


@pytest.mark.network_guard
async def test_delivery_callbacks_inbound_replies_and_sweeps_under_the_guard(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
    network_guard: NetworkGuard,
) -> None:
    from app.db.models import Message
    from app.worker import guarantees
    from app.worker.queue import close_queue, create_queue
    from app.worker.tasks import sweep
    from tests.api.test_inbound import twilio_inbound
    from tests.api.test_status_callbacks import twilio_callback
    from tests.domain.test_delivery import RecordingProvider, twilio_created
    from tests.test_end_to_end import post_message, run_worker

    provider = RecordingProvider(twilio_created)
    message = await post_message(api, world, **{"from": world.twilio_sender.address})
    await run_worker(provider)  # claim, gate (Redis), provider call (HTTP), record
    async with session_factory() as session:
        stored = await session.get(Message, uuid.UUID(message["id"]))
    assert stored is not None and stored.status == "sent"
    sid = stored.provider_message_id or ""
    delivered = await twilio_callback(api, stored.id, "delivered", MessageSid=sid, SmsSid=sid)
    assert delivered.status_code in (200, 204), delivered.text
    async with session_factory() as session:
        assert (await session.get(Message, stored.id)) is not None
        assert (await session.get(Message, stored.id)).status == "delivered"  # type: ignore[union-attr]
    stop = await twilio_inbound(api, "STOP")  # records the opt-out, queues a confirmation
    assert stop.status_code == 200, stop.text
    await run_worker(provider)  # the confirmation goes out

    queue = create_queue(TEST_REDIS_URL)
    ctx: dict[str, Any] = {
        "settings": make_settings(),
        "session_factory": session_factory,
        "providers": provider.providers(),
        "redis": queue,
    }
    try:
        await sweep(ctx)
        await guarantees.reconcile_sweep(ctx)
        await guarantees.status_check_sweep(ctx)
    finally:
        await close_queue(queue)
    assert len(provider.requests) == 2
    assert network_guard.checked > 10
