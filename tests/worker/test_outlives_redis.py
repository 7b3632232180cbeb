"""A worker process outlives a Redis outage: Redis is killed under a running `smsgate worker`
(a private redis-server on a port of its own, never the machine's shared one), and the process
stays up, logs the outage once, and delivers again within seconds of Redis's return.

Before the fix, arq's job pickup (a WATCH pipeline redis-py never retries) raised
ConnectionError out of `Worker.main` and the process exited with status 1."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db.models import Message
from app.db.session import SessionFactory
from tests.conftest import World, owned_database_url
from tests.faults.servers import RedisServer, ServerUnavailable, free_port
from tests.processes import alive, clean_env, start_smsgate, stop


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill."""
    try:
        server = RedisServer(tmp_path / "redis", free_port())
    except ServerUnavailable as missing:
        raise AssertionError(f"this test needs redis-server: {missing}") from None
    server.start()
    yield server
    server.stop()


async def status_of(session_factory: SessionFactory, message_id: str) -> str:
    async with session_factory() as session:
        status = await session.scalar(
            select(Message.status).where(Message.id == uuid.UUID(message_id))
        )
    return str(status)


async def eventually(
    check: Callable[[], Any], timeout: float, what: str, *, every: float = 0.1
) -> float:
    """Seconds until `await check()` is true (fails the test after `timeout`)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


@pytest.fixture
async def api_on(
    app_factory: Callable[..., Any], private_redis: RedisServer
) -> AsyncIterator[httpx.AsyncClient]:
    async with app_factory(redis_url=private_redis.url()) as client:
        yield client


def log_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            lines.append({"level": "raw", "message": line})
    return lines


async def test_a_worker_outlives_redis_and_delivers_again_soon_after_its_return(
    session_factory: SessionFactory,
    world: World,
    private_redis: RedisServer,
    api_on: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=private_redis.url(),
        DB_POOL_SIZE="4",
        FAKE__DELIVERY_DELAY_SECONDS="0",
        SWEEP_GRACE_SECONDS="1",
        LOG_FORMAT="json",
    )
    worker = start_smsgate("worker", env=env, log=log)

    async def send() -> str:
        response = await api_on.post(
            "/v1/messages",
            json={"to": "+14155550123", "from": "+14155550199", "body": "Your code is 1042."},
            headers=world.auth(),
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def sent(message_id: str) -> Callable[[], Any]:
        async def check() -> bool:
            return await status_of(session_factory, message_id) in ("sent", "delivered")

        return check

    try:
        first = await send()
        await eventually(sent(first), 60, "the worker to deliver before the outage")

        private_redis.stop()  # SIGKILL: every key is lost
        await asyncio.sleep(4)  # pickups, the feed's pops and the crons all fail meanwhile
        assert worker.poll() is None and alive(worker.pid), log.read_text()[-3000:]
        during = await send()  # accepted (stored); its push to Redis fails: the sweep's job

        private_redis.start()  # the same port, empty
        returned = time.monotonic()
        after = await send()
        took = await eventually(sent(after), 30, "a message sent after Redis's return")
        # Resumes within seconds of the return (the feed's next pop, or a retried command).
        assert took < 5.0, took
        # The message accepted while Redis was down is found by the sweep (every 10 s).
        await eventually(sent(during), 30, "the message accepted during the outage")
        assert time.monotonic() - returned < 25

        assert worker.poll() is None and alive(worker.pid)
    finally:
        status = stop(worker)
    assert status == 0, log.read_text()[-3000:]

    lines = log_lines(log)
    errors = [line for line in lines if line.get("level") in ("error", "critical", "raw")]
    assert errors == [], errors[:5]
    messages = [line.get("msg") for line in lines]
    assert messages.count("redis available again") >= 1
    # One warning when the outage starts (a reminder at most once a minute), not one per
    # failed command.
    assert 1 <= messages.count("redis unavailable") <= 2, messages
