"""Scheduled messages outlive their worker and Redis: a real `smsgate worker` is stopped while
messages are scheduled, Redis is emptied, and a new worker sends each one within 2 s of its
`send_at` (one whose time came while no worker ran, as soon as the new one starts)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, select, update

from app.db.models import Message
from app.db.session import SessionFactory
from tests.conftest import TEST_REDIS_URL, World, owned_database_url
from tests.processes import clean_env, start_smsgate, stop
from tests.worker.test_outlives_redis import eventually, status_of

FAKE_SENDER = "+14155550199"


async def schedule(api: httpx.AsyncClient, world: World, to: str) -> str:
    send_at = (datetime.now(UTC) + timedelta(seconds=120)).isoformat()
    response = await api.post(
        "/v1/messages",
        json={"to": to, "from": FAKE_SENDER, "body": "Your appointment", "send_at": send_at},
        headers=world.auth(),
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "scheduled"
    return str(response.json()["id"])


async def move_send_at(session_factory: SessionFactory, message_id: str, seconds: float) -> None:
    """As if the clock had moved on: send_at `seconds` from the database's now."""
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(message_id))
            .values(send_at=func.now() + timedelta(seconds=seconds))
        )


def sent(session_factory: SessionFactory, message_id: str) -> Any:
    async def check() -> bool:
        return await status_of(session_factory, message_id) in ("sent", "delivered")

    return check


async def lateness(session_factory: SessionFactory, message_id: str) -> float:
    """Seconds from its send_at to its claim (both the database's clock)."""
    async with session_factory() as session:
        send_at, claimed_at = (
            await session.execute(
                select(Message.send_at, Message.claimed_at).where(
                    Message.id == uuid.UUID(message_id)
                )
            )
        ).one()
    assert send_at is not None and claimed_at is not None
    return float((claimed_at - send_at).total_seconds())


async def test_a_scheduled_message_is_sent_within_2s_of_send_at_after_a_restart_and_redis_loss(
    session_factory: SessionFactory,
    world: World,
    api: httpx.AsyncClient,
    redis: Redis,
    tmp_path: Path,
) -> None:
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=TEST_REDIS_URL,
        DB_POOL_SIZE="4",
        FAKE__DELIVERY_DELAY_SECONDS="0",
        LOG_FORMAT="json",
    )
    first = start_smsgate("worker", env=env, log=tmp_path / "first.log")
    try:
        now = await api.post(
            "/v1/messages",
            json={"to": "+14155550125", "from": FAKE_SENDER, "body": "Now"},
            headers=world.auth(),
        )
        await eventually(sent(session_factory, now.json()["id"]), 60, "the first worker to run")
        overdue = await schedule(api, world, "+14155550123")
        on_time = await schedule(api, world, "+14155550124")
        await asyncio.sleep(3)  # the first worker polls: not due, nothing leaves early
        assert await status_of(session_factory, overdue) == "scheduled"
        assert await status_of(session_factory, on_time) == "scheduled"
    finally:
        assert stop(first) == 0, (tmp_path / "first.log").read_text()[-3000:]

    # While no worker runs: one message falls due, the other will shortly; Redis loses all.
    await move_send_at(session_factory, overdue, -1)
    await move_send_at(session_factory, on_time, 15)
    await redis.flushdb()

    second = start_smsgate("worker", env=env, log=tmp_path / "second.log")
    try:
        await eventually(
            sent(session_factory, overdue), 14, "the overdue message, once the new worker runs"
        )
        assert await status_of(session_factory, on_time) == "scheduled"  # not early
        await eventually(
            sent(session_factory, on_time), 30, "the message due while the new worker runs"
        )
        late = await lateness(session_factory, on_time)
        assert 0 <= late <= 2.0, late
    finally:
        assert stop(second) == 0, (tmp_path / "second.log").read_text()[-3000:]
