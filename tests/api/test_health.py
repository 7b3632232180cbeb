"""Health, readiness, and what the API answers when PostgreSQL is down."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.test_send import assert_problem
from tests.conftest import World

UNREACHABLE_DATABASE = "postgresql+asyncpg://postgres@127.0.0.1:1/smsgate"


async def test_ready_when_postgresql_and_redis_answer(api: httpx.AsyncClient) -> None:
    response = await api.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"postgresql": "ok", "redis": "ok", "migrations": "ok"},
    }


async def test_not_ready_when_redis_is_down(app_factory: Any) -> None:
    async with app_factory(redis_url="redis://127.0.0.1:1/0") as api:
        response = await api.get("/readyz")
        health = await api.get("/healthz")

    assert response.status_code == 503
    assert response.json()["checks"]["postgresql"] == "ok"
    assert response.json()["checks"]["redis"].startswith("error")
    assert health.status_code == 200  # alive, just not ready


async def test_a_database_outage_is_a_503_with_retry_after(app_factory: Any, world: World) -> None:
    async with app_factory(database_url=UNREACHABLE_DATABASE) as api:
        response = await api.post(
            "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth()
        )
        ready = await api.get("/readyz")

    assert_problem(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "5"
    assert ready.status_code == 503
    assert ready.json()["checks"]["postgresql"].startswith("error")
