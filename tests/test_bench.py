"""The benchmark's own parts: its fake Twilio must be what our adapter expects of Twilio (the
figures mean nothing otherwise), its HTTP pooling must hand every connection back, and its
anchors must do the durable work they stand for (or the ratios beside them lie)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Message, OptOut
from app.kernel.status import MessageStatus
from app.providers.base import CallbackRequest, Encoding, OutboundSms
from app.providers.twilio import MESSAGE_SID_PATTERN, TwilioProvider, TwilioSettings
from bench.anchor import QUEUE_KEY, Anchor
from bench.baselines import loop
from bench.cpu import descendants, postgres_cpu, process_cpu, tree_cpu
from bench.fake_twilio import FakeTwilio
from bench.load import percentile
from bench.transports import PooledTransport
from tests.conftest import TEST_REDIS_URL, World

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "f" * 32


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTwilio, str]]:
    twilio = FakeTwilio(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN)
    server = await asyncio.start_server(twilio.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield twilio, f"http://127.0.0.1:{port}"


def sms(message_id: uuid.UUID) -> OutboundSms:
    return OutboundSms(
        message_id=message_id,
        to="+14155550123",
        sender="72345",
        body="Your order #1042 has shipped.",
        encoding=Encoding.GSM7,
    )


async def test_the_adapter_sends_to_the_fake_as_to_twilio_and_its_callback_verifies(
    fake: tuple[FakeTwilio, str],
) -> None:
    twilio, base_url = fake
    settings = TwilioSettings(
        account_sid=ACCOUNT_SID, auth_token=SecretStr(AUTH_TOKEN), base_url=base_url
    )
    message_id = uuid.uuid4()
    async with httpx.AsyncClient() as http:
        provider = TwilioProvider(settings, http, "http://127.0.0.1:8000")
        accepted = await provider.send(sms(message_id))

        assert MESSAGE_SID_PATTERN.fullmatch(accepted.provider_message_id)
        assert twilio.stats()["received"] == 1 and twilio.stats()["duplicates"] == 0
        assert twilio.receipts[0][0] == str(message_id)
        url, form = twilio.held_callbacks[0]
        request = CallbackRequest(
            url=url,
            method="POST",
            params=form,
            headers={"x-twilio-signature": twilio.signature(url, form)},
        )
        assert provider.verify_callback(request)
        report = provider.parse_status_callback(request)
        assert report.status is MessageStatus.DELIVERED
        assert report.provider_message_id == accepted.provider_message_id
        assert report.message_id == message_id

        # The same message twice is counted as a duplicate (the benchmark fails on any).
        await provider.send(sms(message_id))
        assert twilio.stats()["duplicates"] == 1


async def test_the_fake_refuses_another_account(fake: tuple[FakeTwilio, str]) -> None:
    _, base_url = fake
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{base_url}/2010-04-01/Accounts/AC{'1' * 32}/Messages.json",
            data={"To": "+14155550123", "From": "72345", "Body": "x"},
        )
    assert response.status_code == 404


async def test_pooled_transport_spreads_requests_and_hands_connections_back(
    fake: tuple[FakeTwilio, str],
) -> None:
    twilio, base_url = fake
    transport = PooledTransport(25)
    url = f"{base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    async with httpx.AsyncClient(transport=transport) as http:

        async def post(n: int) -> int:
            response = await http.post(
                url, data={"To": "+14155550123", "From": "1", "Body": f"{n}"}
            )
            return response.status_code

        statuses = await asyncio.gather(*(post(n) for n in range(100)))

        assert statuses == [201] * 100
        assert twilio.stats()["received"] == 100
        assert len(transport._pools) == 3  # 25 connections in pools of at most 10
        assert transport._busy == [0, 0, 0]  # every response closed gave its connection back


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([3.0, 1.0, 2.0], 0.0) == 1.0


@pytest.fixture
async def anchor(database: str, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    app = Anchor(database.replace("postgresql+asyncpg://", "postgresql://", 1), TEST_REDIS_URL, 2)
    await app.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://anchor") as client:
        yield client
    await app.stop()


def order(world: World, to: str = "+14155550123") -> dict[str, Any]:
    return {"to": to, "from": world.twilio_sender.address, "body": "Your order has shipped."}


async def test_the_accept_anchor_stores_and_enqueues_as_the_service_does(
    anchor: httpx.AsyncClient, world: World, session: AsyncSession, redis: Redis
) -> None:
    response = await anchor.post("/v1/messages", json=order(world), headers=world.auth())

    assert response.status_code == 202
    # bench.load reads bodies by Content-Length (no chunked encoding)
    assert response.headers["content-length"] == str(len(response.content))
    answer = response.json()
    assert answer["status"] == "queued" and answer["encoding"] == "GSM-7"
    message = await session.get(Message, uuid.UUID(answer["id"]))
    assert message is not None
    assert (message.status, message.client_id, message.sender_id, message.to) == (
        "queued",
        world.client_id,
        world.twilio_sender.id,
        "+14155550123",
    )
    events = (
        await session.execute(
            text("SELECT status, source FROM message_events WHERE message_id = :id"),
            {"id": message.id},
        )
    ).all()
    assert [tuple(event) for event in events] == [("queued", "api")]
    assert await redis.lrange(QUEUE_KEY, 0, -1) == [answer["id"].encode()]  # type: ignore[misc]


async def test_the_accept_anchor_refuses_what_the_service_refuses(
    anchor: httpx.AsyncClient, world: World, session: AsyncSession, redis: Redis
) -> None:
    opted_out = "+14155550124"
    async with session.begin():
        session.add(OptOut(phone=opted_out, action="opt_out", source="api"))
    refusals = [
        (await anchor.post("/v1/messages", json=order(world))),
        (await anchor.post("/v1/messages", json=order(world), headers=world.auth("sk_nope"))),
        (await anchor.post("/v1/messages", json=order(world, "12"), headers=world.auth())),
        (
            await anchor.post(
                "/v1/messages", json=order(world, "+14155550124"), headers=world.auth()
            )
        ),
    ]

    assert [(r.status_code, r.json()["code"]) for r in refusals] == [
        (401, "missing_api_key"),
        (401, "invalid_api_key"),
        (422, "validation_failed"),
        (422, "recipient_opted_out"),
    ]
    assert await session.scalar(text("SELECT count(*) FROM messages")) == 0
    assert await redis.llen(QUEUE_KEY) == 0  # type: ignore[misc]


async def test_the_delivery_anchor_claims_sends_and_records_each_message_once(
    anchor: httpx.AsyncClient,
    world: World,
    session: AsyncSession,
    fake: tuple[FakeTwilio, str],
    database: str,
) -> None:
    twilio, base_url = fake
    accepted = await anchor.post("/v1/messages", json=order(world), headers=world.auth())
    message_id = uuid.UUID(accepted.json()["id"])
    args = argparse.Namespace(
        dsn=database.replace("postgresql+asyncpg://", "postgresql://", 1),
        provider_url=base_url,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        pool=1,
        concurrency=2,
    )

    first = await loop(args, [message_id])
    again = await loop(args, [message_id])  # no longer queued: nothing is sent

    assert (first["messages"], first["failures"], again["failures"]) == (1, 0, 1)
    assert twilio.stats()["received"] == 1
    message = await session.get(Message, message_id)
    assert message is not None
    assert (message.status, message.attempts, message.claimed_at is not None) == ("sent", 1, True)
    assert message.provider_message_id and MESSAGE_SID_PATTERN.fullmatch(
        message.provider_message_id
    )
    events = await session.scalars(
        text("SELECT status FROM message_events WHERE message_id = :id ORDER BY id"),
        {"id": message_id},
    )
    assert list(events) == ["queued", "sending", "sent"]


def test_cpu_is_read_for_a_process_its_children_and_the_database_server() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in descendants(os.getpid())
        burn = time.process_time() + 0.05
        while time.process_time() < burn:
            pass
        assert process_cpu(os.getpid()) >= 0.05
        assert tree_cpu(os.getpid()) >= process_cpu(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert postgres_cpu() > 0  # the tests' PostgreSQL runs on this machine


def test_the_load_generators_result_reaches_the_benchmark_whole_through_a_full_pipe() -> None:
    """A pickup run's result (every accepted id) is far larger than a pipe holds; written to a
    non-blocking pipe that the reader drains slowly, it used to be cut at 64 KiB."""
    from bench.load import write_all

    data = os.urandom(400_000).hex().encode()  # 800 kB
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    received = bytearray()

    def reader() -> None:
        while chunk := os.read(read_end, 4096):
            received.extend(chunk)
            time.sleep(0.0005)

    thread = threading.Thread(target=reader)
    thread.start()
    write_all(write_end, data)
    os.close(write_end)
    thread.join(timeout=30)
    os.close(read_end)
    assert bytes(received) == data
