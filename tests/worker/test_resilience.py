"""ResilientWorker's parts: a pickup cut short by Redis gives its job slot back (arq keeps it,
and after `max_jobs` such failures picks up nothing ever again); a job that meets an unavailable
dependency is put off (a periodic one skipped) and counted in that outage, not logged as an
error; the health record is withheld while PostgreSQL is down."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from arq import Retry, cron
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError

from app.worker.resilience import ResilientWorker
from tests.conftest import TEST_REDIS_URL
from tests.faults.servers import free_port


async def refused(ctx: dict[str, Any]) -> None:
    raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")


async def buggy(ctx: dict[str, Any]) -> None:
    raise ValueError("a bug")


def worker_on(pool: ArqRedis, cls: type[Worker] = ResilientWorker, **options: Any) -> Worker:
    return cls(
        functions=[refused, buggy],
        cron_jobs=[cron(refused, name="refused_cron", second=0)],
        redis_pool=pool,
        handle_signals=False,
        max_jobs=2,
        **options,
    )


@pytest.mark.parametrize("cls", [ResilientWorker, Worker])
async def test_a_pickup_cut_short_by_redis_gives_its_slot_back(cls: type[Worker]) -> None:
    pool = ArqRedis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    worker = worker_on(pool, cls)
    tried = 0
    try:
        for _ in range(3):
            try:
                await worker.start_jobs([b"job-1"])
            except RedisConnectionError:
                tried += 1
    finally:
        await pool.aclose()
    if cls is ResilientWorker:  # every pickup tried, every slot back
        assert (tried, worker.job_counter) == (3, 0)
    else:  # arq alone: both slots (max_jobs) lost for good; it never tries to pick up again
        assert (tried, worker.job_counter) == (2, 2)


async def test_a_job_meeting_an_outage_is_put_off_and_counted_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    pool = ArqRedis.from_url(TEST_REDIS_URL)
    worker = worker_on(pool)
    try:
        ctx: dict[str, Any] = {}
        with pytest.raises(Retry):
            await worker.functions["refused"].coroutine(ctx)
        assert await worker.functions["refused_cron"].coroutine(ctx) is None  # next run
        with pytest.raises(ValueError):  # a bug stays a failure
            await worker.functions["buggy"].coroutine(ctx)
        outage = worker.ctx["db_outage"]
        assert outage.down and outage.failures == 2

        # Not ready while PostgreSQL is down: the health key is removed, not refreshed.
        await pool.set(worker.health_check_key, b"stale")
        await worker.record_health()
        assert await pool.get(worker.health_check_key) is None
        outage.recovered()
        await worker.record_health()
        assert await pool.get(worker.health_check_key) is not None
    finally:
        await pool.delete(worker.health_check_key)
        await pool.aclose()
    assert [r.levelname for r in caplog.records if r.name.startswith("app")] == [
        "WARNING",
        "WARNING",
    ]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("app")] == [
        "postgresql unavailable",
        "postgresql available again",
    ]
