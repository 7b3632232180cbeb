"""Quotas hold across API processes: two real `smsgate serve` processes share one client's limit
through Redis, and concurrent sends to both never get more accepted than the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from app.db.session import SessionFactory
from tests.api.test_send import message_count
from tests.api.test_traffic import US, away_from_window_edge
from tests.conftest import PUBLIC_BASE_URL, TEST_REDIS_URL, World, owned_database_url
from tests.processes import clean_env, free_port, start_smsgate, stop, wait_http_ok

LIMIT = 15
PER_PROCESS = 20


@pytest.fixture
async def two_apis(tmp_path: Path, world: World, redis: Redis) -> AsyncIterator[list[str]]:
    """Two API processes on loopback ports, sharing the test database and Redis."""
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=TEST_REDIS_URL,
        PUBLIC_BASE_URL=PUBLIC_BASE_URL,
        DB_POOL_SIZE="8",
    )
    ports = [free_port(), free_port()]
    processes = []
    try:
        for port in ports:
            log = tmp_path / f"api-{port}.log"
            process = start_smsgate("serve", "--port", str(port), env=env, log=log)
            processes.append(process)
            url = f"http://127.0.0.1:{port}/healthz"
            await asyncio.to_thread(wait_http_ok, url, process, log, 60)
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            await asyncio.to_thread(stop, process)


async def test_concurrent_sends_to_two_processes_never_exceed_the_quota(
    two_apis: list[str], world: World, session_factory: SessionFactory
) -> None:
    first, second = two_apis
    async with httpx.AsyncClient(timeout=30) as http:
        # Set through one process; the other has never read the client's rules.
        response = await http.put(
            f"{first}/v1/clients/shop/traffic",
            json={"messages_per_minute": LIMIT},
            headers=world.auth(world.admin_key),
        )
        assert response.status_code == 200, response.text
        await away_from_window_edge(60, margin=20)

        async def one(base: str, n: int) -> httpx.Response:
            body = {"to": US, "body": f"Your code is {n:06d}"}
            return await http.post(f"{base}/v1/messages", json=body, headers=world.auth())

        responses = await asyncio.gather(
            *(one(base, n) for n in range(PER_PROCESS) for base in (first, second))
        )

    statuses = [r.status_code for r in responses]
    assert statuses.count(202) == LIMIT, statuses
    assert statuses.count(429) == 2 * PER_PROCESS - LIMIT, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Policy"] == f'"messages-minute";q={LIMIT};w=60'
        assert refused.headers["RateLimit"].startswith('"messages-minute";r=0;t=')
    # Exactly the accepted ones were stored (per-process limits would have let 2 x LIMIT in).
    assert await message_count(session_factory) == LIMIT
