"""The fault-injection suite: real API and worker processes, their own PostgreSQL and Redis, a
fake Twilio that records every submission, and faults injected while a batch is sent.

Run with `./scripts/test-faults` (CI runs it from `.ci/run`); `FAULT_SUITE=1` enables it, so a
plain `pytest` skips it. It prints what it saw (accepted, delivered, failed, duplicates, lost, the
fastest each sender went) and checks, from the provider's record and the database:
- every accepted message is in exactly one terminal state (none lost, none created twice by
  retried requests);
- no message reached the provider twice, except after an unknown outcome that the provider
  could not account for, which is recorded (`resubmissions`); every submission is an attempt;
- no sender ever went faster than its rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.access.auth import create_api_key
from app.db.migrations import migrate
from app.db.session import create_session_factory
from app.kernel.status import TERMINAL_STATUSES
from tests.faults.cluster import ROOT, Cluster, tail
from tests.faults.proxy import TcpProxy
from tests.faults.servers import (
    PostgresServer,
    RedisServer,
    ServerUnavailable,
    free_port,
    wait_for_port,
)
from tests.processes import SECRETS_KEY

ACCOUNT_SID = "AC" + "fa" * 16
AUTH_TOKEN = "fault-suite-auth-token"
TERMINAL = {status.value for status in TERMINAL_STATUSES}
# Every wait in the suite is bounded by one of these.
ACCEPT_DEADLINE_SECONDS = 120.0
SETTLE_DEADLINE_SECONDS = 240.0


@dataclass
class Infra:
    """The suite's own servers, the proxies in front of them, and the fake provider."""

    directory: Path
    postgres: PostgresServer
    redis: RedisServer
    pg_proxy: TcpProxy
    redis_proxy: TcpProxy
    provider_proxy: TcpProxy
    fake_port: int
    fake: subprocess.Popen[bytes]
    api_ports: list[int]
    engine: AsyncEngine

    def env(self, **overrides: str) -> dict[str, str]:
        """The service's environment: everything through the proxies, short timeouts."""
        values = {
            "DATABASE_URL": self.postgres.url(self.pg_proxy.listen_port),
            "REDIS_URL": self.redis.url(self.redis_proxy.listen_port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.api_ports[0]}",
            "TWILIO__ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO__AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO__BASE_URL": f"http://127.0.0.1:{self.provider_proxy.listen_port}",
            "PROVIDER_CONNECT_TIMEOUT_SECONDS": "0.5",
            "PROVIDER_READ_TIMEOUT_SECONDS": "2",
            "RETRY_BASE_DELAY_SECONDS": "0.2",
            "RETRY_MAX_DELAY_SECONDS": "2",
            "SEND_MAX_ATTEMPTS": "10",
            "SWEEP_GRACE_SECONDS": "3",
            "CIRCUIT_OPEN_SECONDS": "2",
            "WORKER_METRICS_PORT": "0",
            "SECRETS_KEY": SECRETS_KEY,
            "ACCEPT_DEFAULT_KEYWORD_REPLIES": "true",
            "LOG_LEVEL": "INFO",  # the worker's "Starting worker" line says it is ready
            "LOG_FORMAT": "text",
        }
        values.update(overrides)
        return values

    async def faults(self, **faults: float) -> None:
        """Set the fake provider's faults."""
        async with httpx.AsyncClient() as http:
            response = await http.post(f"http://127.0.0.1:{self.fake_port}/_faults", json=faults)
            response.raise_for_status()

    async def records(self) -> dict[str, Any]:
        """Everything the fake provider received and created."""
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(f"http://127.0.0.1:{self.fake_port}/_records")
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result


@pytest.fixture(scope="module")
async def infra() -> AsyncIterator[Infra]:
    """PostgreSQL, Redis, three proxies and the fake provider, for the whole module."""
    directory = Path(tempfile.mkdtemp(prefix="smsgate-faults-"))
    directory.chmod(0o755)  # PostgreSQL runs as another user when we are root
    try:
        postgres = PostgresServer(directory / "postgres", free_port())
        redis = RedisServer(directory / "redis", free_port())
    except ServerUnavailable as error:
        pytest.fail(f"the fault suite needs its own servers: {error}")
    postgres.start()
    redis.start()
    pg_proxy = TcpProxy(free_port(), postgres.port)
    redis_proxy = TcpProxy(free_port(), redis.port)
    fake_port = free_port()
    provider_proxy = TcpProxy(free_port(), fake_port)
    for proxy in (pg_proxy, redis_proxy, provider_proxy):
        await proxy.start()
    api_ports = [free_port(), free_port()]
    (directory / "logs").mkdir()
    fake_log = (directory / "logs" / "fake-twilio.log").open("wb")
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.faults.fake_twilio",
            "--port",
            str(fake_port),
            "--auth-token",
            AUTH_TOKEN,
            "--callback-targets",
            ",".join(f"http://127.0.0.1:{port}" for port in api_ports),
        ],
        cwd=ROOT,
        stdout=fake_log,
        stderr=subprocess.STDOUT,
    )
    fake_log.close()
    engine: AsyncEngine | None = None
    try:
        wait_for_port(fake_port)
        admin = create_async_engine(postgres.url(database="postgres"), isolation_level="AUTOCOMMIT")
        async with admin.connect() as connection:
            await connection.execute(text("CREATE DATABASE smsgate"))
        await admin.dispose()
        await asyncio.to_thread(migrate, postgres.url())
        engine = create_async_engine(postgres.url(), pool_pre_ping=True)
        yield Infra(
            directory,
            postgres,
            redis,
            pg_proxy,
            redis_proxy,
            provider_proxy,
            fake_port,
            fake,
            api_ports,
            engine,
        )
    finally:
        if engine is not None:
            await engine.dispose()
        fake.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fake.wait(timeout=10)
        if fake.poll() is None:
            fake.kill()
        for proxy in (pg_proxy, redis_proxy, provider_proxy):
            await proxy.stop()
        redis.stop()
        postgres.stop()
        if os.environ.get("FAULT_KEEP_LOGS") != "1":
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Sender:
    """A sender of the scenario and the messages it sends."""

    address: str
    rate: float
    count: int
    fallback: str | None = None


@dataclass
class Batch:
    """What the client saw: accepted messages by idempotency key, and refusals."""

    accepted: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    retried_requests: int = 0


async def setup_senders(infra: Infra, api: str, senders: list[Sender]) -> str:
    """Create the senders through the API (admin key) and a client key; returns the latter."""
    factory = create_session_factory(infra.engine)
    async with factory.begin() as session:
        await session.execute(
            text(
                "TRUNCATE messages, message_events, idempotency_keys, api_keys, clients, "
                "senders RESTART IDENTITY CASCADE"
            )
        )
        admin_key = await create_api_key(session, "ops", is_admin=True)
        client_key = await create_api_key(session, "shop")
    async with httpx.AsyncClient(timeout=10) as http:
        for sender in senders:
            response = await http.post(
                f"{api}/v1/senders",
                headers={"Authorization": f"Bearer {admin_key}"},
                json={
                    "address": sender.address,
                    "kind": "long_code",
                    "provider": "twilio",
                    "fallback_provider": sender.fallback,
                    "rate_per_second": sender.rate,
                },
            )
            assert response.status_code == 201, response.text
            granted = await http.put(  # the client key sends from them
                f"{api}/v1/senders/{response.json()['id']}/clients/shop",
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            assert granted.status_code == 200, granted.text
    return client_key


async def send_batch(
    apis: list[str], client_key: str, senders: list[Sender], *, per_second: float, tag: str
) -> Batch:
    """Send every sender's messages through the APIs in turn, retrying a request (same
    Idempotency-Key) on connection errors, 409 and 5xx, as a careful client does."""
    batch = Batch()
    plan = [
        (sender, index)
        for index, sender in enumerate(
            itertools.chain.from_iterable([s] * s.count for s in senders)
        )
    ]
    random.shuffle(plan)
    limit = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, sender: Sender, index: int) -> None:
        key = f"{tag}-{index}"
        to = f"+1415555{index % 100:04d}" if index % 2 else f"+1212555{index % 100:04d}"
        body = {"to": to, "from": sender.address, "body": f"Order #{index} has shipped ({tag})."}
        deadline = time.monotonic() + ACCEPT_DEADLINE_SECONDS
        tries = 0
        async with limit:
            while time.monotonic() < deadline:
                api = apis[(index + tries) % len(apis)]
                tries += 1
                try:
                    response = await http.post(
                        f"{api}/v1/messages",
                        json=body,
                        headers={"Authorization": f"Bearer {client_key}", "Idempotency-Key": key},
                    )
                except httpx.HTTPError:
                    response = None
                if response is not None and response.status_code == 202:
                    batch.accepted[key] = response.json()["id"]
                    batch.retried_requests += tries - 1
                    return
                if (
                    response is not None
                    and response.status_code < 500
                    and response.status_code != 409
                ):
                    batch.refused.append(f"{key}: {response.status_code} {response.text[:200]}")
                    return
                await asyncio.sleep(0.3)
        batch.gave_up.append(key)

    async with httpx.AsyncClient(timeout=5) as http:
        tasks = []
        for sender, index in plan:
            tasks.append(asyncio.create_task(one(http, sender, index)))
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*tasks)
    return batch


async def statuses(infra: Infra, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The accepted messages' rows, by id (read directly, not through the proxy)."""
    async with infra.engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT id::text, status, attempts, resubmissions, provider_message_id, "
                'error_code, provider, "from" FROM messages WHERE id::text = ANY(:ids)'
            ),
            {"ids": ids},
        )
        return {row.id: dict(row._mapping) for row in rows}


async def wait_until_settled(
    infra: Infra, cluster: Cluster, ids: list[str], deadline_seconds: float
) -> dict[str, dict[str, Any]]:
    """Poll until every message is terminal (restarting dead processes meanwhile) or time is up."""
    deadline = time.monotonic() + deadline_seconds
    rows = await statuses(infra, ids)
    while time.monotonic() < deadline:
        if len(rows) == len(ids) and all(row["status"] in TERMINAL for row in rows.values()):
            break
        await asyncio.to_thread(cluster.supervise)
        await asyncio.sleep(0.5)
        rows = await statuses(infra, ids)
    return rows


@dataclass
class Report:
    """The suite's findings."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def problem(self, line: str) -> None:
        self.problems.append(line)


def max_in_window(times: list[float], window: float) -> int:
    """The most submissions within any `window` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def check(
    infra: Infra,
    batch: Batch,
    rows: dict[str, dict[str, Any]],
    senders: list[Sender],
    *,
    started: float,
    redis_restarts: int,
) -> Report:
    """Every invariant, from the provider's record and the database; the counts."""
    report = Report()
    records = await infra.records()
    ids = list(batch.accepted.values())
    created: dict[str, list[str]] = defaultdict(list)
    for item in records["created"]:
        created[item["message_id"]].append(item["sid"])
    submissions: dict[str, int] = Counter(s["message_id"] for s in records["submissions"])
    outcomes = Counter(s["outcome"] for s in records["submissions"] if s["message_id"] in rows)

    statuses_seen = Counter(row["status"] for row in rows.values())
    lost = [i for i in ids if i not in rows or rows[i]["status"] not in TERMINAL]
    async with infra.engine.connect() as connection:
        stored = await connection.scalar(text("SELECT count(*) FROM messages"))
        slowest = await connection.scalar(
            text(
                "SELECT extract(epoch FROM max(updated_at - created_at)) FROM messages "
                "WHERE id::text = ANY(:ids)"
            ),
            {"ids": ids},
        )
    duplicates = sum(max(len(created[i]) - 1, 0) for i in ids)
    unexplained = [
        i for i in ids if len(created[i]) > 1 + (rows[i]["resubmissions"] if i in rows else 0)
    ]
    unrecorded = [i for i in ids if i in rows and submissions[i] > rows[i]["attempts"]]
    wrong_sid = [
        i
        for i in ids
        if i in rows
        and rows[i]["provider"] == "twilio"
        and rows[i]["status"] in {"sent", "delivered"}
        and rows[i]["provider_message_id"] not in created[i]
    ]
    # Failed over to the built-in fake: never also created at Twilio.
    failed_over = [i for i in ids if i in rows and rows[i]["provider"] == "fake"]
    both = [i for i in failed_over if created[i]]
    failures = Counter(row["error_code"] for row in rows.values() if row["status"] == "failed")

    report.add(f"accepted    {len(ids)} (client requests retried: {batch.retried_requests})")
    report.add(f"delivered   {statuses_seen['delivered']}")
    report.add(f"failed      {statuses_seen['failed']} {dict(failures) or ''}")
    others = {k: v for k, v in statuses_seen.items() if k not in {"delivered", "failed"}}
    report.add(f"other       {others or 0}")
    report.add(
        f"duplicates  {duplicates} (explained by recorded unknown-outcome resubmissions: "
        f"{duplicates - sum(len(created[i]) - 1 for i in unexplained)})"
    )
    report.add(f"lost        {len(lost)}")
    report.add(f"submissions {sum(submissions[i] for i in ids)} {dict(outcomes)}")
    report.add(
        f"resubmitted {sum(row['resubmissions'] for row in rows.values())} "
        "(after an unknown outcome the provider had no record of)"
    )
    report.add(f"slowest     {float(slowest or 0):.1f}s from accepted to its final status")
    if failed_over:
        report.add(
            f"failed over {len(failed_over)} (to the fallback provider; also at Twilio: "
            f"{len(both)})"
        )
    if both:
        report.problem(f"failed over yet created at the first provider too: {both[:5]}")
    if stored != len(ids):
        report.problem(f"{stored} messages stored for {len(ids)} accepted requests")
    if lost:
        report.problem(f"{len(lost)} accepted messages not terminal: {lost[:5]}")
    if unexplained:
        report.problem(f"messages created twice without a recorded resubmission: {unexplained[:5]}")
    if unrecorded:
        report.problem(f"submissions without a recorded attempt: {unrecorded[:5]}")
    if wrong_sid:
        report.problem(f"sent messages whose SID the provider never created: {wrong_sid[:5]}")
    if batch.refused or batch.gave_up:
        report.problem(f"requests refused {batch.refused[:3]} / given up {batch.gave_up[:3]}")
    times: dict[str, list[float]] = defaultdict(list)
    for submission in records["submissions"]:
        if submission["t"] >= started:
            times[submission["from"]].append(submission["t"])
    for sender in senders:
        for window in (1.0, 5.0):
            most = max_in_window(times[sender.address], window)
            # GCRA spaces admissions 1/rate apart: at most rate*window in a window, +1 for where
            # the window starts; plus one per Redis restart (the limiter's state is lost with
            # it); plus 10% (at least one) for jitter between the admission and the request
            # reaching the provider.
            allowed = int(sender.rate * window) + 1 + redis_restarts
            allowed += max(1, int(sender.rate * window * 0.1))
            report.add(
                f"pace        {sender.address}: at most {most} in {window:.0f}s "
                f"(rate {sender.rate:g}/s: {sender.rate * window:g}; allowed {allowed})"
            )
            if most > allowed:
                report.problem(f"{sender.address} sent {most} in {window}s at {sender.rate}/s")
    return report


async def run_timeline(
    steps: list[tuple[float, str, Callable[[], Awaitable[None]]]], log: list[str]
) -> None:
    """Run each fault at its time (seconds from now), noting what was done when."""
    start = time.monotonic()
    for at, name, action in steps:
        await asyncio.sleep(max(at - (time.monotonic() - start), 0))
        try:
            await action()
            log.append(f"{time.monotonic() - start:5.1f}s {name}")
        except Exception as error:  # a fault that could not be injected is reported, not fatal
            log.append(f"{time.monotonic() - start:5.1f}s {name} FAILED: {error!r}")


def write_report(
    capsys: pytest.CaptureFixture[str],
    title: str,
    report: Report,
    timeline: list[str],
    seconds: float,
    cluster: Cluster,
) -> None:
    lines = [f"\n=== {title} ({seconds:.0f}s) ===", *timeline, *report.lines]
    if cluster.crashed:
        lines.append(f"process exits restarted: {cluster.crashed}")
    lines.extend(f"PROBLEM: {problem}" for problem in report.problems)
    with capsys.disabled():
        sys.stdout.write("\n".join(lines) + "\n")


def failure_context(cluster: Cluster) -> str:
    """The end of each process's log."""
    return "\n".join(
        f"--- {process.log.name}\n{tail(process.log)}" for process in cluster.apis + cluster.workers
    )


async def test_sigterm_mid_batch_loses_and_duplicates_nothing(
    infra: Infra, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling deploy of workers: SIGTERM while provider calls are in flight. The worker
    finishes them before it exits; nothing is interrupted, reconciled, lost or sent twice."""
    started_at = time.monotonic()
    senders = [Sender("+14155550111", rate=20.0, count=40)]
    await infra.faults(p500=0, p429=0, p_hang=0, p_slow_created=0, latency=0.6)
    cluster = Cluster(infra.env(), infra.directory / "logs", infra.api_ports[:1], worker_count=2)
    await asyncio.to_thread(cluster.start)
    timeline: list[str] = []
    try:
        api = f"http://127.0.0.1:{infra.api_ports[0]}"
        client_key = await setup_senders(infra, api, senders)
        started = time.time()
        exits: list[float] = []

        async def sigterm_worker() -> None:
            victim = await asyncio.to_thread(cluster.kill_worker, signal.SIGTERM)
            t0 = time.monotonic()
            await asyncio.to_thread(victim.popen.wait, 40)
            exits.append(time.monotonic() - t0)
            timeline.append(
                f"       worker exited {exits[-1]:.1f}s after SIGTERM, "
                f"code {victim.popen.returncode}"
            )
            await asyncio.to_thread(cluster.supervise)

        sending = asyncio.create_task(
            send_batch([api], client_key, senders, per_second=40, tag="sigterm")
        )
        await run_timeline(
            [
                (1.0, "SIGTERM a worker mid-call", sigterm_worker),
                (3.0, "SIGTERM the other worker mid-call", sigterm_worker),
            ],
            timeline,
        )
        batch = await sending
        timeline.append(f"{time.time() - started:5.1f}s every message accepted")
        rows = await wait_until_settled(
            infra, cluster, list(batch.accepted.values()), SETTLE_DEADLINE_SECONDS
        )
        timeline.append(f"{time.time() - started:5.1f}s every message settled (or deadline)")
        report = await check(infra, batch, rows, senders, started=started, redis_restarts=0)
        async with infra.engine.connect() as connection:
            interrupted = await connection.scalar(
                text(
                    "SELECT count(*) FROM message_events WHERE detail LIKE '%interrupted%' "
                    "OR source = 'reconcile'"
                )
            )
        report.add(f"interrupted or reconciled: {interrupted}")
        if interrupted:
            report.problem(f"{interrupted} provider calls were cut short by the shutdown")
        records = await infra.records()
        created = Counter(item["message_id"] for item in records["created"])
        if any(count != 1 for mid, count in created.items() if mid in rows):
            report.problem("a message was created at the provider more or less than once")
        write_report(
            capsys, "SIGTERM mid-batch", report, timeline, time.monotonic() - started_at, cluster
        )
        assert all(
            code == 0 or code == -signal.SIGTERM
            for code in [w.popen.returncode for w in cluster.workers if not w.alive]
        ), "worker exit"
        assert exits and max(exits) < 30, exits
        assert not report.problems, report.problems
    except BaseException:
        with capsys.disabled():
            sys.stdout.write(failure_context(cluster) + "\n")
        raise
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_faults_lose_nothing_and_send_nothing_twice(
    infra: Infra, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two API processes and three workers under SIGKILLs, a Redis and a PostgreSQL restart,
    dropped and delayed connections, and a provider that fails, throttles, times out and goes
    down; every invariant holds and the counts are printed."""
    started_at = time.monotonic()
    senders = [
        Sender("+14155550121", rate=10.0, count=90),
        Sender("+14155550122", rate=8.0, count=80),
        Sender("+14155550123", rate=4.0, count=30),
    ]
    await infra.faults(p500=0.04, p429=0.03, p_hang=0.02, p_slow_created=0.03, latency=0.05)
    cluster = Cluster(infra.env(), infra.directory / "logs", infra.api_ports, worker_count=3)
    await asyncio.to_thread(cluster.start)
    timeline: list[str] = []
    redis_restarts = 0
    try:
        apis = [f"http://127.0.0.1:{port}" for port in infra.api_ports]
        client_key = await setup_senders(infra, apis[0], senders)
        started = time.time()

        async def kill_worker() -> None:
            await asyncio.to_thread(cluster.kill_worker, signal.SIGKILL)

        async def restart_redis() -> None:
            nonlocal redis_restarts
            redis_restarts += 1
            await asyncio.to_thread(infra.redis.crash_and_restart)

        async def restart_postgres() -> None:
            await asyncio.to_thread(infra.postgres.crash_and_restart)

        async def sigterm_api() -> None:
            took = await asyncio.to_thread(cluster.restart_api, 1)
            timeline.append(f"       API drained and exited in {took:.1f}s")

        async def sigterm_worker() -> None:
            await asyncio.to_thread(cluster.kill_worker, signal.SIGTERM)

        async def sync(action: Callable[[], None]) -> None:
            action()

        async def provider_outage() -> None:
            await infra.faults(outage_seconds=3)

        steps: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
            (2.0, "SIGKILL a worker", kill_worker),
            (
                4.0,
                "provider proxy: reset every connection",
                lambda: sync(infra.provider_proxy.reset),
            ),
            (5.0, "Redis proxy: reset every connection", lambda: sync(infra.redis_proxy.reset)),
            (
                6.0,
                "PostgreSQL proxy: delay 100 ms for 3 s",
                lambda: sync(lambda: infra.pg_proxy.delay_for(3, 0.1)),
            ),
            (8.0, "SIGKILL a worker", kill_worker),
            (10.0, "Redis: crash and restart empty", restart_redis),
            (13.0, "provider: 503 to everything for 3 s", provider_outage),
            (15.0, "PostgreSQL: crash and restart", restart_postgres),
            (18.0, "SIGTERM an API process (restarted)", sigterm_api),
            (19.0, "SIGTERM a worker (replaced)", sigterm_worker),
            (
                20.0,
                "provider proxy: refuse connections for 2 s",
                lambda: sync(lambda: infra.provider_proxy.refuse_for(2)),
            ),
            (
                21.0,
                "Redis proxy: delay 50 ms for 3 s",
                lambda: sync(lambda: infra.redis_proxy.delay_for(3, 0.05)),
            ),
            (23.0, "SIGKILL a worker", kill_worker),
            (24.0, "PostgreSQL proxy: reset every connection", lambda: sync(infra.pg_proxy.reset)),
        ]
        sending = asyncio.create_task(
            send_batch(apis, client_key, senders, per_second=12, tag="faults")
        )

        async def supervise_until(done: asyncio.Task[Any]) -> None:
            while not done.done():
                await asyncio.to_thread(cluster.supervise)
                await asyncio.sleep(0.5)

        faults = asyncio.create_task(run_timeline(steps, timeline))
        await asyncio.gather(faults, supervise_until(faults))
        await infra.faults(p500=0, p429=0, p_hang=0, p_slow_created=0)
        timeline.append("       faults stopped")
        batch = await sending
        timeline.append(f"{time.time() - started:5.1f}s every message accepted")
        rows = await wait_until_settled(
            infra, cluster, list(batch.accepted.values()), SETTLE_DEADLINE_SECONDS
        )
        timeline.append(f"{time.time() - started:5.1f}s every message settled (or deadline)")
        report = await check(
            infra, batch, rows, senders, started=started, redis_restarts=redis_restarts
        )
        write_report(
            capsys, "fault injection", report, timeline, time.monotonic() - started_at, cluster
        )
        (infra.directory / "report.json").write_text(json.dumps(report.lines))
        assert not report.problems, report.problems
    except BaseException:
        with capsys.disabled():
            sys.stdout.write(failure_context(cluster) + "\n")
        raise
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_provider_outage_fails_over_without_sending_twice(
    infra: Infra, capsys: pytest.CaptureFixture[str]
) -> None:
    """Twilio goes down (503s, and some requests held past the read timeout) while a sender with a
    fallback provider (the built-in fake) sends: its circuit opens, messages move to the
    fallback, none is sent through both, and Twilio gets messages again once a probe succeeds."""
    started_at = time.monotonic()
    senders = [
        Sender("+14155550131", rate=10.0, count=60, fallback="fake"),
        Sender("+14155550132", rate=10.0, count=20),  # no fallback: waits out the outage
    ]
    await infra.faults(p500=0, p429=0, p_hang=0.05, p_slow_created=0.05, latency=0.05)
    cluster = Cluster(
        infra.env(FAKE__DELIVERY_DELAY_SECONDS="0.2", CIRCUIT_FAILURE_THRESHOLD="3"),
        infra.directory / "logs",
        infra.api_ports[:1],
        worker_count=2,
    )
    await asyncio.to_thread(cluster.start)
    timeline: list[str] = []
    try:
        api = f"http://127.0.0.1:{infra.api_ports[0]}"
        client_key = await setup_senders(infra, api, senders)
        started = time.time()

        async def outage() -> None:
            await infra.faults(outage_seconds=6)

        sending = asyncio.create_task(
            send_batch([api], client_key, senders, per_second=15, tag="failover")
        )
        await run_timeline([(1.5, "Twilio: 503 to everything for 6 s", outage)], timeline)
        batch = await sending
        timeline.append(f"{time.time() - started:5.1f}s every message accepted")
        rows = await wait_until_settled(
            infra, cluster, list(batch.accepted.values()), SETTLE_DEADLINE_SECONDS
        )
        timeline.append(f"{time.time() - started:5.1f}s every message settled (or deadline)")
        report = await check(infra, batch, rows, senders, started=started, redis_restarts=0)
        moved = Counter(row["from"] for row in rows.values() if row["provider"] == "fake")
        if not moved:
            report.problem("no message failed over")
        if set(moved) - {senders[0].address}:
            report.problem(f"a sender without a fallback failed over: {dict(moved)}")
        write_report(
            capsys,
            "provider outage and failover",
            report,
            timeline,
            time.monotonic() - started_at,
            cluster,
        )
        assert not report.problems, report.problems
    except BaseException:
        with capsys.disabled():
            sys.stdout.write(failure_context(cluster) + "\n")
        raise
    finally:
        await asyncio.to_thread(cluster.stop)
