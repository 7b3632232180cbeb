"""Months of traffic (issue 13): a 100,000-line opt-out import beside ordinary work, and list
pages on 200,000 messages and 100,000 opt-outs. Marked `volume` so they can be run alone
(`pytest -m volume`); they run in the normal suite too."""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import httpx
import pytest

from app.domain.optouts import RECIPIENT_LOCKS_SQL
from tests.api.test_opt_outs import import_csv
from tests.conftest import World, owned_database_url

pytestmark = pytest.mark.volume

AREAS = (415, 650, 212, 310, 617, 312, 202, 206, 303, 512)
UNRELATED = "+14085550000"  # in none of the imports below


def import_lines(count: int) -> str:
    """`count` distinct valid numbers, one a line."""
    return "\n".join(f"+1{AREAS[n // 10_000]}555{n % 10_000:04d}" for n in range(count))


class LockProbe(threading.Thread):
    """Takes an unrelated number's recipient lock again and again, in transactions of its own on
    a connection of its own (its own thread and event loop: the API's CPU-bound parsing must not
    delay the probe), and records how long each take waited."""

    def __init__(self, phone: str) -> None:
        super().__init__(daemon=True)
        self.phone = phone
        self.waits: list[float] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._probe())

    async def _probe(self) -> None:
        dsn = owned_database_url().replace("+asyncpg", "")
        connection = await asyncpg.connect(dsn)
        statement = (
            "SELECT locked FROM "
            + RECIPIENT_LOCKS_SQL.format(phones="SELECT $1::text AS phone")
            + " AS held"
        )
        try:
            self.ready.set()
            while not self.stop.is_set():
                started = time.perf_counter()
                async with connection.transaction():
                    await connection.fetchval(statement, self.phone)
                self.waits.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
        finally:
            await connection.close()


async def test_a_large_import_leaves_unrelated_recipients_free(
    api: httpx.AsyncClient, world: World
) -> None:
    probe = LockProbe(UNRELATED)
    probe.start()
    probe.ready.wait(10)
    started = time.perf_counter()
    try:
        response = await import_csv(api, world, import_lines(100_000))
    finally:
        probe.stop.set()
        await asyncio.to_thread(probe.join, 30)
    took = time.perf_counter() - started

    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == 100_000
    assert len(probe.waits) >= 10, (took, probe.waits)  # the probe ran beside the import
    # One chunk's transaction at most (about 1,000 numbers), not the whole import.
    assert max(probe.waits) < 1.0, (took, sorted(probe.waits)[-5:])
