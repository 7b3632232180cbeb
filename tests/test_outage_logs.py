"""Logs at the right level: expected back-pressure during an outage (503s while PostgreSQL is
away, pushes that fail while Redis is) is one warning when the outage starts and one with its
counts when it ends, never an error per request. Before: every 503 was an error line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from app.kernel import outages
from app.kernel.outages import Outage, unavailable_dependency
from tests.conftest import World, owned_database_url
from tests.faults.proxy import TcpProxy
from tests.faults.servers import free_port

SEND = {"to": "+14155550123", "from": "+14155550199", "body": "Your code is 1042."}


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= level and r.name.startswith("app")]


async def test_503s_during_a_database_outage_are_one_warning_then_one_with_counts(
    app_factory: Callable[..., Any], world: World, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(owned_database_url())
    proxy = TcpProxy(free_port(), url.port or 5432)
    await proxy.start()
    through_proxy = url.set(port=proxy.listen_port).render_as_string(hide_password=False)
    caplog.set_level(logging.INFO)
    try:
        async with app_factory(database_url=through_proxy) as api:
            ok = await api.post("/v1/messages", json=SEND, headers=world.auth())
            assert ok.status_code == 202, ok.text
            proxy.refuse_for(3.0)
            proxy.reset()
            statuses = [
                (await api.post("/v1/messages", json=SEND, headers=world.auth())).status_code
                for _ in range(20)
            ]
            assert statuses.count(503) >= 15, statuses
            for _ in range(100):  # the probe notices the return (at most 2 s apart)
                if not api_state_down(caplog):
                    break
                await asyncio.sleep(0.1)
            after = await api.post("/v1/messages", json=SEND, headers=world.auth())
            assert after.status_code == 202, after.text
    finally:
        await proxy.stop()

    assert records(caplog, logging.ERROR) == []
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert warnings.count("postgresql unavailable") == 1, warnings
    assert warnings.count("postgresql available again") == 1, warnings
    back = next(r for r in caplog.records if r.getMessage() == "postgresql available again")
    assert back.failures >= statuses.count(503)  # type: ignore[attr-defined]
    assert back.seconds > 0  # type: ignore[attr-defined]


def api_state_down(caplog: pytest.LogCaptureFixture) -> bool:
    return not any(r.getMessage() == "postgresql available again" for r in caplog.records)


async def test_sends_while_redis_is_down_are_one_warning_not_one_per_request(
    app_factory: Callable[..., Any], world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outages.REDIS.recovered()  # whatever an earlier test left
    caplog.clear()
    async with app_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0") as api:
        for _ in range(10):
            response = await api.post("/v1/messages", json=SEND, headers=world.auth())
            assert response.status_code == 202  # stored; the sweep queues it
    try:
        assert records(caplog, logging.ERROR) == []
        warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
        assert warnings == ["redis unavailable"], warnings
        # Each send's push. The pumping alarm's count (`alert`: off the request, once for the
        # sends of its time) is not tried while Redis is known down.
        assert outages.REDIS.failures == 10
    finally:
        outages.REDIS.recovered()
    assert caplog.records[-1].getMessage() == "redis available again"
    assert caplog.records[-1].failures == 10  # type: ignore[attr-defined]


async def test_a_long_outage_reminds_once_a_minute_with_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = [1000.0]
    outage = Outage("postgresql", clock=lambda: clock[0])
    for _ in range(4500):  # 50 failures a second for a minute and a half
        outage.failed(ConnectionRefusedError(111, "refused"))
        clock[0] += 0.02
    outage.recovered()
    lines = [(r.getMessage(), getattr(r, "failures", None)) for r in caplog.records]
    assert lines[0] == ("postgresql unavailable", None)
    assert lines[1][0] == "postgresql still unavailable"
    assert 3000 <= (lines[1][1] or 0) <= 3002  # a minute in: 60 / 0.02 failures and the first
    assert [m for m, _ in lines] == [
        "postgresql unavailable",
        "postgresql still unavailable",
        "postgresql available again",
    ]
    assert lines[-1][1] == 4500


async def test_a_probe_notices_the_return_without_waiting_for_a_request() -> None:
    answers = [ConnectionRefusedError(111, "refused")] * 2

    async def probe() -> None:
        if answers:
            raise answers.pop()

    outage = Outage("postgresql", probe=probe)
    outage.failed(ConnectionRefusedError(111, "refused"))
    assert outage.down
    for _ in range(50):
        if not outage.down:
            break
        await asyncio.sleep(0.1)
    assert not outage.down and answers == []
    await outage.close()


def test_only_unavailability_counts_as_an_outage() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    assert unavailable_dependency(RedisConnectionError("gone")) == "redis"
    assert unavailable_dependency(ConnectionRefusedError(111, "refused")) == "postgresql"
    assert unavailable_dependency(TimeoutError("past its budget")) is None
    assert unavailable_dependency(ValueError("a bug")) is None


async def test_bugs_and_other_services_failures_are_not_database_outages(database: str) -> None:
    """A wrong statement, a cancelled one, or a provider refusing a connection must stay an
    error (a job put off as "postgresql unavailable" for half an hour hides a bug)."""
    import asyncpg
    import httpx

    connection = await asyncpg.connect(database.replace("postgresql+asyncpg", "postgresql"))
    try:
        try:
            await connection.fetchval("SELECT $1::int", 1, 2)  # one argument too many
        except asyncpg.InterfaceError as error:
            wrong_arguments: BaseException = error
        try:
            await connection.execute("SET statement_timeout = 1; SELECT pg_sleep(1)")
        except asyncpg.QueryCanceledError as error:
            timed_out: BaseException = error
    finally:
        await connection.close()
    try:
        raise httpx.ConnectError("provider refused") from ConnectionRefusedError(111, "refused")
    except httpx.ConnectError as error:
        provider_down: BaseException = error
    closed = asyncpg.InterfaceError("cannot perform operation: connection is closed")

    assert unavailable_dependency(wrong_arguments) is None
    assert unavailable_dependency(timed_out) is None
    assert unavailable_dependency(provider_down) is None
    assert unavailable_dependency(closed) == "postgresql"
