"""The throughput benchmark: `./scripts/bench` (README, "Benchmark").

Starts the service's real processes (uvicorn API, arq delivery workers) against the local
PostgreSQL (a database of its own, made anew) and Redis (a database of its own, flushed), and a
local fake Twilio (bench.fake_twilio). Load comes from other processes (bench.load,
bench.baselines). Each figure is printed beside its anchor from the same run (bare FastAPI,
bench.anchor's plain asyncpg endpoint, a plain `unnest` insert, a plain delivery loop), with the
ratio and the target. The service is reached only over HTTP, Redis, its metrics and its rows
(never by importing its accept or delivery code), so the benchmark measures whatever they become.

Every wait is bounded; every process started is stopped at the end (or on Ctrl-C), and the
benchmark fails unless each message it sent reached a terminal state and none reached the
provider twice.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.cpu import descendants, postgres_cpu, tree_cpu
from bench.load import percentile

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TERMINAL = ("delivered", "undelivered", "failed", "canceled", "expired")
SENDER = "72345"  # a short code: the kind of sender built for volume
ANCHOR_CLIENT = "bench-anchor"  # the accept anchor's client: its messages are deleted after use
ACCEPT_TARGET = ">= 0.3x (aim 0.5x)"
PROCESS_LABELS = {"api": "API", "worker": "Worker"}
# The "Done when", per phase and figure.
TARGETS: dict[str, dict[str, str]] = {
    "single-send accept": {"cpu": "<= 1.0", "postgres": "<= 0.5"},
    "single-send delivery": {"cpu": "<= 2.5", "redis": "<= 6", "statements": "<= 2"}
    | {"rate": ">= 0.5x"},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    """Poll `check` until it holds; fail the benchmark after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(interval)
    raise SystemExit(f"benchmark: timed out after {timeout:.0f}s waiting for {what}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Processes:
    """Every process the benchmark started, each in a session of its own (so its children go
    with it), stopped together at the end."""

    logs: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Run `argv` in the background, its output to `logs/name.log`."""
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def stop(self, name: str) -> None:
        """SIGTERM the process's group; SIGKILL what is left after 15 s."""
        process = self.started.pop(name)
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may outlive its leader for a moment: make sure nothing of it is left.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """Stop everything still running."""
        for name in list(self.started):
            self.stop(name)


def run_json(argv: Sequence[str], timeout: float, stdin: str = "") -> dict[str, Any]:
    """Run a load or baseline process to completion; its JSON output."""
    done = subprocess.run(
        list(argv), cwd=ROOT, input=stdin.encode(), capture_output=True, timeout=timeout
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode())
        raise SystemExit(f"benchmark: {' '.join(argv[:4])} failed")
    if done.stderr:
        sys.stderr.write(done.stderr.decode()[-2000:])
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# The API serves /metrics only to this token (README, "Metrics access"); the service gets it too.
METRICS_TOKEN = "bench-metrics-token"
# Signing secrets are encrypted at rest; the bench's service gets a key of its own each run.
SECRETS_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def scrape(url: str) -> dict[str, float]:
    """Our counters from a Prometheus text page (statements, transactions)."""
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    text = httpx.get(url, timeout=5, headers=headers).text
    values: dict[str, float] = {}
    for name in ("smsgate_db_statements_total", "smsgate_db_transactions_total"):
        values[name] = sum(
            float(match) for match in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        )
    return values


@dataclass
class Snapshot:
    """Counters at one moment: CPU seconds by process kind, SQL statements and transactions."""

    api: float
    anchor: float
    workers: float
    postgres: float
    statements: float
    transactions: float


@dataclass
class Costs:
    """A phase's costs per message: CPU milliseconds by process kind, Redis commands, SQL
    statements and transactions."""

    api_ms: float
    anchor_ms: float
    worker_ms: float
    postgres_ms: float
    redis: float
    statements: float
    transactions: float


@dataclass
class Row:
    """One line of the table."""

    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""


class Benchmark:
    """The whole run; `run()` returns the table."""

    def __init__(self, args: argparse.Namespace, processes: Processes) -> None:
        self.args = args
        self.processes = processes
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.database = args.database
        self.admin_dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
        self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.database}"
        self.redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
        self.redis = redis.Redis.from_url(self.redis_url)
        self.api_port, self.bare_port, self.fake_port = free_port(), free_port(), free_port()
        self.anchor_port = free_port()
        self.worker_metrics_ports: list[int] = []
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.fake = f"http://127.0.0.1:{self.fake_port}"
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.key = ""
        self.anchor_key = ""
        self.sender_id = ""
        self.accepted: list[str] = []  # ids of every message the service accepted
        self.peaks: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The service's environment: its own database and Redis db, Twilio at the fake."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TWILIO__", "VONAGE__", "EVENTS__"))
        }
        env |= {
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.database}",
            "REDIS_URL": self.redis_url,
            "PUBLIC_BASE_URL": self.api,
            "TWILIO__ACCOUNT_SID": self.account_sid,
            "TWILIO__AUTH_TOKEN": self.auth_token,
            "TWILIO__BASE_URL": self.fake,
            "ACCEPT_DEFAULT_KEYWORD_REPLIES": "true",
            "WORKER_METRICS_PORT": "0",
            "EVENTS_WORKER_METRICS_PORT": "0",
            "METRICS_TOKEN": METRICS_TOKEN,
            "SECRETS_KEY": SECRETS_KEY,
            "PYTHONUNBUFFERED": "1",
        }
        return env | extra

    def smsgate(self, *args: str) -> str:
        """Run a `smsgate` command to completion; its output."""
        done = subprocess.run(
            [PYTHON, "-m", "app", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise SystemExit(f"benchmark: smsgate {args[0]} failed:\n{done.stderr}")
        return done.stdout

    def sql(self, sql: str, dsn: str | None = None) -> str:
        """One SQL command with asyncpg, synchronously: its first value."""
        import asyncio

        import asyncpg

        async def query() -> str:
            connection = await asyncpg.connect(dsn or self.dsn)
            try:
                return str(await connection.fetchval(sql))
            finally:
                await connection.close()

        return asyncio.run(query())

    def set_up(self) -> None:
        """A new database at the latest migration, an empty Redis db, the fake provider."""
        self.sql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)", self.admin_dsn)
        self.sql(f"CREATE DATABASE {self.database}", self.admin_dsn)
        self.smsgate("migrate")
        self.redis.flushdb()
        self.key = self.smsgate("create-api-key", "--client", "bench", "--admin").strip()
        self.anchor_key = self.smsgate("create-api-key", "--client", ANCHOR_CLIENT).strip()
        self.processes.start(
            "fake-twilio",
            [
                PYTHON,
                "-m",
                "bench.fake_twilio",
                "--port",
                str(self.fake_port),
                "--account-sid",
                self.account_sid,
                "--auth-token",
                self.auth_token,
            ],
            self.env(),
        )
        wait_until("the fake provider", lambda: self.fake_stats() is not None, 20)

    def fake_stats(self) -> dict[str, Any]:
        """The fake provider's counters."""
        stats: dict[str, Any] = httpx.get(f"{self.fake}/control/stats", timeout=5).json()
        return stats

    def fake_control(self, action: str, timeout: float = 60) -> Any:
        """A control request to the fake provider."""
        return httpx.post(f"{self.fake}/control/{action}", timeout=timeout).json()

    # -- processes -----------------------------------------------------------------------

    def start_api(self) -> None:
        """`smsgate serve`, as in production."""
        self.processes.start(
            "api",
            [
                PYTHON,
                "-m",
                "app",
                "serve",
                "--port",
                str(self.api_port),
                "--workers",
                str(self.args.api_processes),
            ],
            self.env(),
        )
        wait_until(
            "the API", lambda: httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200, 30
        )

    def start_workers(self) -> None:
        """`smsgate worker`, `--workers` of them (metrics on new ports each start)."""
        self.worker_metrics_ports = [free_port() for _ in range(self.args.workers)]
        for number, port in enumerate(self.worker_metrics_ports):
            self.processes.start(
                f"worker-{number}",
                [PYTHON, "-m", "app", "worker"],
                self.env(
                    WORKER_METRICS_PORT=str(port),
                    WORKER_CONCURRENCY=str(self.args.worker_concurrency),
                ),
            )
        for port in self.worker_metrics_ports:
            wait_until(
                "a worker",
                lambda port=port: (
                    httpx.get(  # type: ignore[misc]
                        f"http://127.0.0.1:{port}/", timeout=2
                    ).status_code
                    == 200
                ),
                30,
            )

    def stop_workers(self) -> None:
        """Stop every worker (their peak RSS noted first)."""
        self.record_peaks()
        for name in [name for name in self.processes.started if name.startswith("worker")]:
            self.processes.stop(name)
        self.worker_metrics_ports = []

    def record_peaks(self) -> None:
        """Peak RSS of every API and worker process, read before they stop."""
        for name, process in self.processes.started.items():
            if not name.startswith(("api", "worker", "bare", "anchor")):
                continue
            for pid in descendants(process.pid):
                try:
                    label = name if pid == process.pid else f"{name} (child {pid})"
                    self.peaks[label] = max(self.peaks.get(label, 0.0), peak_rss_mb(pid))
                except OSError:
                    continue

    def load(
        self, *extra: str, port: int | None = None, key: str = "", timeout: float = 120
    ) -> dict[str, Any]:
        """One run of bench.load against the API (or an anchor)."""
        argv = [
            PYTHON,
            "-m",
            "bench.load",
            "--port",
            str(port or self.api_port),
            "--key",
            key or self.key,
            "--sender",
            SENDER,
            *extra,
        ]
        result = run_json(argv, timeout)
        self.accepted.extend(result.pop("ids"))
        return result

    def load_batches(self, count: int, concurrency: int) -> dict[str, Any]:
        """`count` requests of 1,000 messages to the batch endpoint."""
        return self.load(
            "--path", "/v1/messages/batch", "--batch", "1000", "--ids",
            "--concurrency", str(concurrency), "--count", str(count), "--duration", "120",
        )  # fmt: skip

    def statements(self) -> dict[str, float]:
        """SQL statements and transactions so far, API and workers together."""
        urls = [f"{self.api}/metrics"]
        urls += [f"http://127.0.0.1:{port}/" for port in self.worker_metrics_ports]
        totals = {"statements": 0.0, "transactions": 0.0}
        for url in urls:
            try:
                values = scrape(url)
            except httpx.HTTPError:
                continue  # workers not started yet
            totals["statements"] += values["smsgate_db_statements_total"]
            totals["transactions"] += values["smsgate_db_transactions_total"]
        return totals

    def redis_commands(self) -> dict[str, int]:
        """Calls per command since the last reset (INFO commandstats, the whole server)."""
        stats: dict[str, Any] = self.redis.info("commandstats")  # type: ignore[assignment]
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name.startswith("cmdstat_") and name != "cmdstat_config" and name != "cmdstat_info"
        }

    def wait_submitted(self, count: int, timeout: float) -> dict[str, Any]:
        """Until the fake provider has `count` distinct submissions since its last reset."""
        wait_until(
            f"{count} submissions", lambda: self.fake_stats()["distinct"] >= count, timeout, 0.2
        )
        return self.fake_stats()

    # -- costs ----------------------------------------------------------------------------

    def cpu_of(self, prefix: str) -> float:
        """CPU seconds of the running processes named `prefix`* (and their children)."""
        return sum(
            tree_cpu(process.pid)
            for name, process in self.processes.started.items()
            if name.startswith(prefix)
        )

    def snapshot(self) -> Snapshot:
        """Counters at the start of a phase (Redis's are reset instead: they are the server's)."""
        self.redis.config_resetstat()
        return self.snapshot_now()

    def costs(self, phase: str, messages: int, before: Snapshot) -> Costs:
        """What a phase cost per message since `before`."""
        after = self.snapshot_now()
        commands = self.redis_commands()
        top = sorted(commands.items(), key=lambda item: -item[1])[:6]
        self.notes.append(
            f"Redis commands during {phase} ({messages} messages): "
            + ", ".join(f"{name} {calls}" for name, calls in top)
        )
        per = 1000 / max(messages, 1)  # seconds per phase -> milliseconds per message
        self.notes.append(
            f"SQL transactions / message during {phase}: "
            f"{(after.transactions - before.transactions) / max(messages, 1):.2f}"
        )
        return Costs(
            api_ms=(after.api - before.api) * per,
            anchor_ms=(after.anchor - before.anchor) * per,
            worker_ms=(after.workers - before.workers) * per,
            postgres_ms=(after.postgres - before.postgres) * per,
            redis=sum(commands.values()) / max(messages, 1),
            statements=(after.statements - before.statements) / max(messages, 1),
            transactions=(after.transactions - before.transactions) / max(messages, 1),
        )

    def snapshot_now(self) -> Snapshot:
        """The counters now, Redis's left as they are."""
        return Snapshot(
            api=self.cpu_of("api"),
            anchor=self.cpu_of("anchor"),
            workers=self.cpu_of("worker"),
            postgres=postgres_cpu(),
            **self.statements(),
        )

    def cost_rows(
        self, phase: str, costs: Costs, process: str, anchor: dict[str, float] | None = None
    ) -> None:
        """Rows: `process`'s CPU, PostgreSQL's CPU, Redis commands and SQL statements per
        message, beside the anchor's (`anchor`, by the same keys) and the phase's targets."""
        targets = TARGETS.get(phase, {})
        figures = {
            "cpu": (f"{PROCESS_LABELS[process]} CPU ms / message", getattr(costs, f"{process}_ms")),
            "postgres": ("PostgreSQL CPU ms / message", costs.postgres_ms),
            "redis": ("Redis commands / message", costs.redis),
            "statements": ("SQL statements / message", costs.statements),
        }
        for key, (figure, value) in figures.items():
            base = (anchor or {}).get(key)
            self.rows.append(
                Row(
                    f"{figure} ({phase})",
                    f"{value:.2f}",
                    "" if base is None else f"{base:.2f}",
                    f"{value / base:.1f}x" if base else "",
                    targets.get(key, ""),
                )
            )

    # -- phases ---------------------------------------------------------------------------

    def bare_endpoint(self) -> dict[str, Any]:
        """The accept rate's first anchor: the bare endpoint, served the same way."""
        self.processes.start(
            "bare",
            [
                PYTHON,
                "-m",
                "bench.bare",
                "--port",
                str(self.bare_port),
                "--workers",
                str(self.args.api_processes),
            ],
            self.env(),
        )
        wait_until("the bare endpoint", lambda: listening(self.bare_port), 30)
        common = ["--concurrency", str(self.args.concurrency)]
        self.load(*common, "--duration", "1", port=self.bare_port)  # warm-up
        result = self.load(*common, "--duration", str(self.args.duration), port=self.bare_port)
        self.record_peaks()
        self.processes.stop("bare")
        return result

    def anchor_endpoint(self) -> tuple[dict[str, Any], Costs, list[str]]:
        """The accept rate's second anchor (bench.anchor: the same durable work on plain
        asyncpg, one statement), under the same load; its rate, costs and messages."""
        self.processes.start(
            "anchor",
            [PYTHON, "-m", "bench.anchor", "--port", str(self.anchor_port)],
            self.env(BENCH_ANCHOR_POOL=str(self.args.concurrency)),
        )
        wait_until("the accept anchor", lambda: listening(self.anchor_port), 30)
        common = ["--concurrency", str(self.args.concurrency), "--ids"]
        previous = len(self.accepted)
        port, key = self.anchor_port, self.anchor_key
        self.load(*common, "--duration", "1", port=port, key=key)  # warm-up
        before = self.snapshot()
        result = self.load(*common, "--duration", str(self.args.duration), port=port, key=key)
        costs = self.costs("accept anchor", result["messages"], before)
        self.record_peaks()
        self.processes.stop("anchor")
        # Its messages are not the service's: they go to the delivery anchor, then away.
        ids = self.accepted[previous:]
        del self.accepted[previous:]
        return result, costs, ids

    def delivery_anchors(self, ids: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The plain delivery loop over the accept anchor's messages, against the instant
        provider and (unless quick) the 100 ms one; then those messages are deleted, before
        any worker (and its sweep) runs."""
        concurrency = self.args.workers * self.args.worker_concurrency
        postgres = postgres_cpu()
        instant = self.plain_loop(ids, concurrency)
        instant["postgres_ms_per_message"] = (postgres_cpu() - postgres) * 1000 / max(len(ids), 1)
        slow = None
        if self.args.slow_messages:
            self.sql(
                "UPDATE messages SET status = 'queued', attempts = 0, provider_message_id = NULL "
                f"WHERE client_id = (SELECT id FROM clients WHERE name = '{ANCHOR_CLIENT}')"
            )
            self.fake_control("delay?ms=100")
            slow = self.plain_loop(ids[: self.args.slow_messages], concurrency)
            self.fake_control("delay?ms=0")
        self.sql(
            "DELETE FROM messages "
            f"WHERE client_id = (SELECT id FROM clients WHERE name = '{ANCHOR_CLIENT}')"
        )
        return instant, slow

    def accept_single(self, bare: dict[str, Any], anchor: dict[str, Any], costs: Costs) -> float:
        """`POST /v1/messages` back to back, no workers running; the rate reached."""
        common = ["--concurrency", str(self.args.concurrency), "--ids"]
        self.load(*common, "--duration", "1")  # warm-up (these are delivered later, too)
        before = self.snapshot()
        accept = self.load(*common, "--duration", str(self.args.duration))
        measured = self.costs("accept", accept["messages"], before)
        key = "requests_per_second"
        self.compare_rate("Accept anchor, plain asyncpg (req/s)", anchor, bare, key, "")
        self.compare_rate("Accept, POST /v1/messages (req/s)", accept, bare, key, ACCEPT_TARGET)
        self.compare_rate("Accept, POST /v1/messages (req/s)", accept, anchor, key, "vs anchor")
        self.rows.append(
            Row(
                "Accept latency p50 / p99 (ms)",
                f"{accept['p50_ms']:.1f} / {accept['p99_ms']:.1f}",
                f"{anchor['p50_ms']:.1f} / {anchor['p99_ms']:.1f}",
            )
        )
        anchor_costs = {
            "cpu": costs.anchor_ms,
            "postgres": costs.postgres_ms,
            "redis": costs.redis,
            "statements": 1.0,  # its one statement, by construction (lookups are cached)
        }
        self.cost_rows("single-send accept", measured, "api", anchor_costs)
        rate: float = accept[key]
        return rate

    def deliver(self, phase: str, ids: list[str], plain: dict[str, Any]) -> None:
        """Start the workers on a backlog of `ids` and wait until each reached the provider;
        rate and costs per message beside the delivery anchor's."""
        self.fake_control("reset")
        self.start_workers()
        # From here on: the work done while the workers were starting is not counted (a few
        # jobs at most); their start-up (imports, connections) is not counted either.
        before = self.snapshot()
        stats = self.wait_submitted(len(ids), timeout=300)
        costs = self.costs(phase, len(ids), before)
        elapsed = max(stats["last"] - stats["first"], 1e-3)
        rate = {"messages_per_second": stats["distinct"] / elapsed}
        self.compare_rate(
            f"Delivery rate, {phase} (msg/s, {self.args.workers} workers)",
            rate,
            plain,
            "messages_per_second",
            TARGETS.get(phase, {}).get("rate", ""),
        )
        anchor = {
            "cpu": plain["cpu_ms_per_message"],
            "postgres": plain["postgres_ms_per_message"],
            "statements": 2.0,  # its claim and its record, by construction
        }
        self.cost_rows(phase, costs, "worker", anchor)

    def pickup(self, rate: float, label: str) -> None:
        """Single sends at `rate` a second (open loop), workers running: commit -> provider
        p50 / p99."""
        self.fake_control("reset")
        previous = len(self.accepted)
        before = self.snapshot()
        paced = self.load(
            "--rate",
            f"{max(rate, 1):.0f}",
            "--duration",
            str(self.args.duration),
            "--concurrency",
            str(self.args.concurrency),
            "--ids",
        )
        pickup_ids = self.accepted[previous:]
        self.wait_submitted(len(pickup_ids), timeout=60)
        costs = self.costs(f"pickup ({label})", len(pickup_ids), before)
        latencies = self.pickup_latencies(pickup_ids)
        at_rate = f"{paced['requests_per_second']:.0f} req/s ({label})"
        self.rows.append(
            Row(
                f"Pickup, commit -> provider p50 / p99 (ms), {at_rate}",
                f"{percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f}",
                target="p99 < 50",
            )
        )
        # What the machine spends per message at that rate, accept and delivery together: with
        # the load generator and the fake provider, it is what fills (or not) the two cores.
        self.rows.append(
            Row(
                f"Pickup: API / worker / PostgreSQL CPU ms per message, {at_rate}",
                f"{costs.api_ms:.2f} / {costs.worker_ms:.2f} / {costs.postgres_ms:.2f}",
            )
        )

    def run(self) -> list[Row]:
        """Every phase, in order; the table."""
        self.set_up()
        bare = self.bare_endpoint()
        self.start_api()
        self.create_sender()
        anchor, anchor_costs, anchor_ids = self.anchor_endpoint()
        plain, slow_plain = self.delivery_anchors(anchor_ids)

        # Single sends: accepted with no worker running, then delivered; then pickup.
        single_rate = self.accept_single(bare, anchor, anchor_costs)
        self.deliver("single-send delivery", list(self.accepted), plain)
        self.pickup(single_rate / 2, "half the single-send max")
        # The same at a tenth of the maximum: what the feed adds when the machine is not busy.
        self.pickup(single_rate / 10, "a tenth of the single-send max")
        self.stop_workers()

        # Batches: accepted with no worker running, then delivered.
        if self.args.batches:
            previous = len(self.accepted)
            self.batch_accept()
            self.deliver("batch-accepted delivery", self.accepted[previous:], plain)
            if slow_plain is not None:
                self.slow_provider(slow_plain)
            self.stop_workers()

        # Status callbacks (API only); then every message must be terminal, none sent twice.
        before = self.snapshot()
        callbacks = self.fake_control("callbacks", timeout=300)
        costs = self.costs("status callbacks", len(self.accepted), before)
        self.cost_rows("status callbacks", costs, "api")
        self.check_terminal(callbacks)
        self.record_peaks()
        for label, peak in sorted(self.peaks.items()):
            self.rows.append(Row(f"Peak RSS, {label} (MiB)", f"{peak:.0f}", target="< 150"))
        return self.rows

    def create_sender(self) -> None:
        """The short code every load sends from, through the API."""
        sender = httpx.post(
            f"{self.api}/v1/senders",
            headers={"Authorization": f"Bearer {self.key}"},
            json={
                "address": SENDER,
                "kind": "short_code",
                "provider": "twilio",
                "rate_per_second": 10_000,
            },
            timeout=10,
        )
        sender.raise_for_status()
        self.sender_id = sender.json()["id"]

    def batch_accept(self) -> None:
        """Batches of 1,000 through the API, then the same rows with plain asyncpg."""
        args = self.args
        before = self.snapshot()
        batch = self.load_batches(args.batches, args.batch_concurrency)
        costs = self.costs("batch accept", batch["messages"], before)
        insert = run_json(
            [
                PYTHON,
                "-m",
                "bench.baselines",
                "insert",
                "--dsn",
                self.dsn,
                "--concurrency",
                str(args.batch_concurrency),
                "--sender",
                SENDER,
                "--sender-id",
                self.sender_id,
                "--batches",
                str(args.batches),
            ],
            120,
        )
        self.compare_rate("Batch accept (msg/s)", batch, insert, "messages_per_second", ">= 0.5x")
        self.cost_rows("batch accept", costs, "api")

    def slow_provider(self, slow_plain: dict[str, Any]) -> None:
        """Delivery while the provider takes 100 ms to answer, beside the plain loop."""
        concurrency = self.args.workers * self.args.worker_concurrency
        self.fake_control("delay?ms=100")
        self.fake_control("reset")
        previous = len(self.accepted)
        self.load_batches(max(1, self.args.slow_messages // 1000), 1)
        slow_ids = self.accepted[previous:]
        stats = self.wait_submitted(len(slow_ids), timeout=120)
        slow = {"messages_per_second": stats["distinct"] / (stats["last"] - stats["first"])}
        self.compare_rate(
            f"Delivery, 100 ms provider (msg/s; bound {concurrency} / 0.1 s = {concurrency * 10})",
            slow,
            slow_plain,
            "messages_per_second",
            "set by concurrency",
        )
        self.fake_control("delay?ms=0")

    def plain_loop(self, ids: list[str], concurrency: int) -> dict[str, Any]:
        """The delivery anchor over `ids`' rows (the accept anchor's)."""
        self.fake_control("reset")
        result = run_json(
            [
                PYTHON,
                "-m",
                "bench.baselines",
                "loop",
                "--dsn",
                self.dsn,
                "--concurrency",
                str(concurrency),
                "--provider-url",
                self.fake,
                "--account-sid",
                self.account_sid,
                "--auth-token",
                self.auth_token,
            ],
            180,
            stdin="\n".join(ids),
        )
        if result["failures"]:
            raise SystemExit(f"benchmark: the plain loop had {result['failures']} failures")
        self.fake_control("reset")
        return result

    def pickup_latencies(self, ids: list[str]) -> list[float]:
        """Seconds from each message's creation (just before its commit) to its arrival at the
        provider: an upper bound of commit -> provider."""
        import asyncio

        import asyncpg

        receipts = dict(self.fake_control_get("receipts"))

        async def created() -> dict[str, float]:
            connection = await asyncpg.connect(self.dsn)
            try:
                rows = await connection.fetch(
                    "SELECT id::text, extract(epoch FROM created_at)::float8 AS t "
                    "FROM messages WHERE id = ANY($1::uuid[])",
                    [uuid.UUID(i) for i in ids],
                )
            finally:
                await connection.close()
            return {row["id"]: row["t"] for row in rows}

        created_at = asyncio.run(created())
        return [(receipts[i] - created_at[i]) * 1000 for i in ids if i in receipts]

    def fake_control_get(self, what: str) -> Any:
        """A control read from the fake provider."""
        return httpx.get(f"{self.fake}/control/{what}", timeout=30).json()

    def check_terminal(self, callbacks: dict[str, int]) -> None:
        """Every accepted message terminal within a bounded wait; none submitted twice."""
        import asyncio

        import asyncpg

        async def statuses() -> dict[str, int]:
            connection = await asyncpg.connect(self.dsn)
            try:
                rows = await connection.fetch(
                    "SELECT status, count(*) AS n FROM messages WHERE id = ANY($1::uuid[]) "
                    "GROUP BY status",
                    [uuid.UUID(i) for i in self.accepted],
                )
            finally:
                await connection.close()
            return {row["status"]: row["n"] for row in rows}

        counts: dict[str, int] = {}

        def all_terminal() -> bool:
            counts.clear()
            counts.update(asyncio.run(statuses()))
            return sum(counts.get(status, 0) for status in TERMINAL) == len(self.accepted)

        deadline = time.monotonic() + 60
        while not all_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        stats = self.fake_stats()
        summary = (
            f"{len(self.accepted)} messages accepted; final statuses {counts}; "
            f"{stats['seen']} reached the provider, {stats['duplicates']} of them twice; "
            f"{callbacks['sent']} status callbacks delivered, {callbacks['failed']} refused"
        )
        self.notes.append(summary)
        if not all_terminal() or stats["duplicates"] or callbacks["failed"]:
            raise SystemExit(f"benchmark: end-to-end check failed: {summary}")

    def compare_rate(
        self, figure: str, value: dict[str, Any], baseline: dict[str, Any], key: str, target: str
    ) -> None:
        """A row: value, baseline, ratio."""
        ratio = value[key] / baseline[key]
        self.rows.append(
            Row(figure, f"{value[key]:,.0f}", f"{baseline[key]:,.0f}", f"{ratio:.2f}x", target)
        )


def print_table(rows: list[Row], notes: list[str], args: argparse.Namespace) -> None:
    """The table, then the notes."""
    header = Row("figure", "value", "baseline", "ratio", "target")
    widths = [
        max(len(getattr(row, name)) for row in [header, *rows])
        for name in ("figure", "value", "baseline", "ratio", "target")
    ]
    out = sys.stdout
    out.write(
        f"\nsmsgate benchmark: {os.cpu_count()} CPUs, {args.api_processes} API process(es), "
        f"{args.workers} worker process(es) x {args.worker_concurrency} in flight, "
        f"concurrency {args.concurrency}\n\n"
    )
    for row in [header, *rows]:
        cells = [getattr(row, name) for name in ("figure", "value", "baseline", "ratio", "target")]
        out.write("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)))
        out.write("\n")
    out.write("\n" + "\n".join(notes) + "\n")


def main() -> None:
    """Parse options, run, print, clean up."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per timed load")
    parser.add_argument("--concurrency", type=int, default=32, help="connections, single sends")
    parser.add_argument("--api-processes", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="delivery worker processes")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=100,
        help="messages in flight per worker (WORKER_CONCURRENCY)",
    )
    parser.add_argument("--batches", type=int, default=10, help="batch requests of 1,000")
    parser.add_argument("--batch-concurrency", type=int, default=2)
    parser.add_argument("--slow-messages", type=int, default=3000)
    parser.add_argument("--redis-db", type=int, default=11)
    parser.add_argument(
        "--database", default="smsgate_bench", help="made anew (dropped if it exists)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run that checks every phase works (about a minute; figures rough)",
    )
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.batches, args.slow_messages = 2.0, 2, 0
    logs = Path(tempfile.mkdtemp(prefix="smsgate-bench-"))
    processes = Processes(logs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    started = time.monotonic()
    benchmark = Benchmark(args, processes)
    try:
        rows = benchmark.run()
    finally:
        processes.stop_all()
        benchmark.redis.flushdb()
        if not args.keep_logs:
            for log in logs.iterdir():
                log.unlink()
            logs.rmdir()
        else:
            sys.stderr.write(f"process logs in {logs}\n")
    print_table(rows, benchmark.notes, args)
    sys.stdout.write(f"\nbenchmark took {time.monotonic() - started:.0f} s\n")


if __name__ == "__main__":
    main()
