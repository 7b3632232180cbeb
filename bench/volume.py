"""Months of traffic (issue 13): `python -m bench.volume` (README, "Volume figures").

Starts the real API (`smsgate serve`, one process) on a database of its own made anew
(`--database`, default smsgate_volume) and a Redis db of its own, flushed (`--redis-db`). Then:

1. For a few seconds with nothing else running, and again during one `--lines`-line
   `POST /v1/opt-outs/import`, it keeps sending (`POST /v1/messages` to numbers not in the file),
   opting out (`PUT /v1/opt-outs/{phone}`, which takes that number's recipient lock in the API),
   and taking an unrelated number's recipient lock directly (as a worker's claim does), one at a
   time each, and prints the import's duration and each probe's latencies, idle and during it.
2. It seeds 200,000 messages and 100,000 opt-out history rows with set-based SQL (the same as
   tests/test_volume.py) and prints the time of each list's first page and of a deep cursor page
   (the median of five requests over HTTP).

No worker runs: sends are accepted and stay queued. Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.consent.optouts import RECIPIENT_LOCKS_SQL
from app.db.session import create_engine
from app.kernel.pagination import encode_cursor
from bench.__main__ import PYTHON, ROOT, Processes, free_port, wait_until
from bench.load import percentile

AREAS = (415, 650, 212, 310, 617, 312, 202, 206, 303, 512)
POPULAR = "+14155551000"  # every tenth seeded message goes to this number
SENDER = "+14155550100"


def import_lines(count: int) -> str:
    """`count` distinct valid numbers (at most 100,000), one a line."""
    return "\n".join(f"+1{AREAS[n // 10_000]}555{n % 10_000:04d}" for n in range(count))


def unrelated(n: int) -> str:
    """Numbers in none of the imports (area 408)."""
    return f"+1408555{n % 10_000:04d}"


# 200,000 messages of two clients, 10% of them to POPULAR, ten seconds apart.
SEED_MESSAGES = """
INSERT INTO messages (id, client_id, sender_id, kind, "to", "from", body, encoding, segments,
    status, provider, created_at, updated_at, next_attempt_at)
SELECT gen_random_uuid(),
    CASE WHEN n % 2 = 0 THEN CAST(:shop AS uuid) ELSE CAST(:other AS uuid) END,
    CAST(:sender AS uuid), 'regular',
    CASE WHEN n % 20 < 2 THEN :popular
        ELSE '+1415555' || lpad((2000 + n % 7000)::text, 4, '0') END,
    :sender_address, 'Your code is ' || n, 'GSM-7', 1, 'delivered', 'fake',
    now() - make_interval(secs => n * 10), now(), now()
FROM generate_series(1, 200000) AS n
"""
# 100,000 history rows: 90,000 numbers opted out of one sender or service-wide, then 10,000 of
# them opted back in, service-wide.
SEED_OPT_OUTS = """
INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
SELECT '+1' || (CAST(:areas AS text[]))[n / 10000 + 1] || '555'
        || lpad((n % 10000)::text, 4, '0'),
    CASE WHEN n % 3 = 0 THEN NULL ELSE CAST(:sender AS uuid) END, 'opt_out',
    'import', 'client:operator', now() - make_interval(secs => 200000 - n)
FROM generate_series(0, 89999) AS n
"""
SEED_OPT_INS = """
INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
SELECT phone, NULL, 'opt_in', 'api', 'client:operator', now()
FROM (SELECT DISTINCT phone FROM opt_outs ORDER BY phone LIMIT 10000) AS lifted
"""
# 5,000 callback-URL endpoints of one client.
SEED_ENDPOINTS = """
INSERT INTO webhook_endpoints (id, client_id, url, created_at, updated_at)
SELECT gen_random_uuid(), CAST(:shop AS uuid), 'https://hooks.example/' || n,
    now() - make_interval(secs => n), now()
FROM generate_series(1, 5000) AS n
"""


async def seed_months(
    connection: AsyncConnection, *, shop: uuid.UUID, other: uuid.UUID, sender: uuid.UUID
) -> None:
    """The lists' data (in the caller's transaction), then fresh planner statistics."""
    await connection.execute(
        text(SEED_MESSAGES),
        {
            "shop": shop,
            "other": other,
            "sender": sender,
            "popular": POPULAR,
            "sender_address": SENDER,
        },
    )
    await connection.execute(
        text(SEED_OPT_OUTS), {"sender": sender, "areas": [str(area) for area in AREAS]}
    )
    await connection.execute(text(SEED_OPT_INS))
    await connection.execute(text(SEED_ENDPOINTS), {"shop": shop})
    for table in ("messages", "opt_outs", "opt_out_states", "webhook_endpoints"):
        await connection.execute(text(f"ANALYZE {table}"))


# The cursor a client paging this deep would hold, per list (`:shop`: the client's id).
DEEP_ROWS = {
    "opt-outs": "SELECT changed_at, history_id FROM opt_out_states WHERE action = 'opt_out' "
    "ORDER BY changed_at DESC, history_id DESC OFFSET 50000 LIMIT 1",
    "messages": "SELECT created_at, id FROM messages WHERE client_id = :shop "
    "ORDER BY created_at DESC, id DESC OFFSET 90000 LIMIT 1",
    "messages?to=": 'SELECT created_at, id FROM messages WHERE client_id = :shop AND "to" = '
    f"'{POPULAR}' ORDER BY created_at DESC, id DESC OFFSET 9000 LIMIT 1",
    "event-endpoints": "SELECT created_at, id FROM webhook_endpoints WHERE client_id = :shop "
    "ORDER BY created_at, id OFFSET 4000 LIMIT 1",
}


@dataclass
class Probe:
    """One kind of small operation, repeated one at a time: its latencies (seconds)."""

    name: str
    run: Callable[[int], Awaitable[None]]
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    async def loop(self, stop: asyncio.Event, pause: float = 0.05) -> None:
        """Run until `stop` is set."""
        n = 0
        while not stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                await self.run(n)
            except (httpx.HTTPError, AssertionError, OSError):
                self.failures += 1
            self.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(pause)

    def summary(self) -> str:
        """count, p50, p99 and max in ms."""
        values = self.latencies
        if not values:
            return "no samples"
        ms = [value * 1000 for value in values]
        failed = f", {self.failures} failed" if self.failures else ""
        return (
            f"{len(ms)} samples: p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f}"
            f" ms, max {max(ms):.1f} ms{failed}"
        )


class Volume:
    """The run: set-up, the import phase, the lists phase."""

    def __init__(self, args: argparse.Namespace, processes: Processes) -> None:
        self.args = args
        self.processes = processes
        self.admin_dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{args.database}"
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.admin_key = ""
        self.client_key = ""
        self.sender_id = ""

    def env(self) -> dict[str, str]:
        """The service's environment: its own database and Redis db."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO__", "VONAGE__"))}
        return env | {
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.args.database}",
            "REDIS_URL": f"redis://127.0.0.1:6379/{self.args.redis_db}",
            "PUBLIC_BASE_URL": self.api,
            "ACCEPT_DEFAULT_KEYWORD_REPLIES": "true",
            "SECRETS_KEY": "dm9sdW1lLWJlbmNoLXNlY3JldHMta2V5LTMyYnl0ZXM=",
            "METRICS_TOKEN": "volume-metrics-token",
            "PYTHONUNBUFFERED": "1",
        }

    def smsgate(self, *args: str) -> str:
        """Run a `smsgate` command to completion; its output."""
        done = subprocess.run(
            [PYTHON, "-m", "app", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise SystemExit(f"volume: smsgate {args[0]} failed:\n{done.stderr}")
        return done.stdout

    async def set_up(self, http: httpx.AsyncClient) -> None:
        """A new database at the latest migration, an empty Redis db, keys, a sender, the API."""
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {self.args.database} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {self.args.database}")
        finally:
            await admin.close()
        self.smsgate("migrate")
        subprocess.run(
            ["redis-cli", "-n", str(self.args.redis_db), "FLUSHDB"],
            check=False,
            capture_output=True,
        )
        self.admin_key = self.smsgate("create-api-key", "--client", "volume", "--admin").strip()
        self.client_key = self.smsgate("create-api-key", "--client", "other").strip()
        self.processes.start(
            "api",
            [PYTHON, "-m", "app", "serve", "--port", str(self.api_port), "--workers", "1"],
            self.env(),
        )
        wait_until(
            "the API", lambda: httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200, 30
        )
        sender = await http.post(
            "/v1/senders",
            json={"address": SENDER, "kind": "long_code", "provider": "fake"},
            headers=self.auth(),
        )
        assert sender.status_code in (200, 201), sender.text
        self.sender_id = sender.json()["id"]

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def probes(self, http: httpx.AsyncClient, lock: asyncpg.Connection) -> list[Probe]:
        """A send, a STOP and a recipient lock, each for numbers the import does not touch."""
        statement = (
            "SELECT locked FROM "
            + RECIPIENT_LOCKS_SQL.format(phones="SELECT $1::text AS phone")
            + " AS held"
        )

        async def send(n: int) -> None:
            response = await http.post(
                "/v1/messages",
                json={"to": unrelated(n), "from": SENDER, "body": f"Your code is {n}"},
                headers=self.auth(),
            )
            assert response.status_code == 202, response.text

        async def stop(n: int) -> None:
            response = await http.put(f"/v1/opt-outs/{unrelated(5000 + n)}", headers=self.auth())
            assert response.status_code == 200, response.text

        async def take_lock(n: int) -> None:
            async with lock.transaction():
                await lock.fetchval(statement, unrelated(n))

        return [
            Probe("send (POST /v1/messages)", send),
            Probe("STOP (PUT /v1/opt-outs/{phone})", stop),
            Probe("recipient lock (a claim's)", take_lock),
        ]

    async def import_phase(self, http: httpx.AsyncClient) -> list[tuple[str, str]]:
        """The probes idle, then during the import; the figures."""
        rows: list[tuple[str, str]] = []
        lock = await asyncpg.connect(self.dsn)
        try:
            idle = self.probes(http, lock)
            stop = asyncio.Event()
            running = [asyncio.create_task(probe.loop(stop)) for probe in idle]
            await asyncio.sleep(self.args.idle_seconds)
            stop.set()
            await asyncio.gather(*running)
            during = self.probes(http, lock)
            stop = asyncio.Event()
            running = [asyncio.create_task(probe.loop(stop)) for probe in during]
            body = import_lines(self.args.lines).encode()
            started = time.perf_counter()
            response = await http.post(
                "/v1/opt-outs/import",
                content=body,
                headers={**self.auth(), "content-type": "text/csv"},
                timeout=900,
            )
            took = time.perf_counter() - started
            stop.set()
            await asyncio.gather(*running)
        finally:
            await lock.close()
        assert response.status_code == 200, response.text
        result = response.json()
        rows.append(
            (
                f"import of {self.args.lines:,} lines",
                f"{took:.1f} s ({result['recorded']:,} recorded, {len(result['errors'])} errors)",
            )
        )
        for before, meanwhile in zip(idle, during, strict=True):
            rows.append((f"{before.name}, idle", before.summary()))
            rows.append((f"{meanwhile.name}, during the import", meanwhile.summary()))
        return rows

    async def lists_phase(self, http: httpx.AsyncClient) -> list[tuple[str, str]]:
        """Seed months of data; each list's first and deep page (median of five)."""
        engine = create_engine(self.env()["DATABASE_URL"], pool_size=1)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("TRUNCATE opt_outs, opt_out_states CASCADE"))
                ids: dict[str, uuid.UUID] = dict(
                    (await connection.execute(text("SELECT name, id FROM clients"))).all()
                )
                started = time.perf_counter()
                await seed_months(
                    connection,
                    shop=ids["volume"],
                    other=ids["other"],
                    sender=uuid.UUID(self.sender_id),
                )
                seeded = time.perf_counter() - started
            cursors = {}
            async with engine.connect() as connection:
                for name, sql in DEEP_ROWS.items():
                    row = (await connection.execute(text(sql), {"shop": ids["volume"]})).one()
                    cursors[name] = encode_cursor(row[0], row[1])
                counts = {
                    table: (
                        await connection.execute(text(f"SELECT count(*) FROM {table}"))
                    ).scalar()
                    for table in ("messages", "opt_outs", "opt_out_states", "webhook_endpoints")
                }
        finally:
            await engine.dispose()
        rows = [
            (
                "seeded (set-based SQL)",
                ", ".join(f"{table} {count:,}" for table, count in counts.items())
                + f" in {seeded:.1f} s",
            )
        ]
        lists: dict[str, tuple[str, dict[str, str]]] = {
            "opt-outs": ("/v1/opt-outs", {}),
            "opt-outs?sender_id=": ("/v1/opt-outs", {"sender_id": self.sender_id}),
            "messages": ("/v1/messages", {}),
            "messages?to=": ("/v1/messages", {"to": POPULAR}),
            "event-endpoints": ("/v1/event-endpoints", {}),
        }
        for name, (path, params) in lists.items():
            deep = cursors.get(name, cursors["opt-outs"])
            for page, extra in (("first page", {}), ("deep page", {"cursor": deep})):
                times = []
                for attempt in range(6):
                    began = time.perf_counter()
                    response = await http.get(path, params=params | extra, headers=self.auth())
                    if attempt:  # the first warms up
                        times.append(time.perf_counter() - began)
                    assert response.status_code == 200, response.text
                rows.append((f"GET {name} {page}", f"{statistics.median(times) * 1000:.1f} ms"))
        return rows

    async def run(self) -> list[tuple[str, str]]:
        """Every phase; the figures."""
        async with httpx.AsyncClient(base_url=self.api, timeout=60) as http:
            await self.set_up(http)
            rows = await self.import_phase(http)
            rows += await self.lists_phase(http)
        return rows


def machine_state() -> str:
    """When, and how busy the (shared) machine was."""
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average {load}"


def main() -> None:
    """Parse arguments, run, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.volume", description=__doc__)
    parser.add_argument("--database", default="smsgate_volume")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    logs = ROOT / ".data" / "volume"
    logs.mkdir(parents=True, exist_ok=True)
    processes = Processes(logs)
    before = machine_state()
    try:
        rows = asyncio.run(Volume(args, processes).run())
    finally:
        processes.stop_all()
    width = max(len(name) for name, _ in rows)
    sys.stdout.write(f"started {before}\nended   {machine_state()}\n")
    for name, value in rows:
        sys.stdout.write(f"{name.ljust(width)}  {value}\n")


if __name__ == "__main__":
    main()
