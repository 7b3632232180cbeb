"""The benchmark's load: HTTP/1.1 keep-alive POSTs from their own process.

A small client on plain asyncio, so the load costs the shared machine little (a full HTTP
client library would take CPU from the server being measured). Two shapes:
- closed loop: `concurrency` connections, each sending its next request as soon as the last was
  answered, for `duration` seconds (or `count` requests);
- open loop: `rate` requests a second on a fixed schedule for `duration` seconds, over up to
  `concurrency` connections; latency counts from the scheduled time, so a stalled server is
  charged for the requests that waited behind it.

Prints one JSON object: requests, statuses, elapsed, rate, p50/p99 latency (ms), and the ids of
the messages accepted (`--ids`), for the benchmark's end-to-end checks.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import select
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Numbers in the +1 415 555 01xx/02xx ranges are valid for phonenumbers (and fictional).
NUMBERS = [f"+1415555{line:04d}" for line in range(100, 300)]


def message(n: int, sender: str) -> dict[str, Any]:
    """The n-th message of a run: an order notice, like most transactional SMS."""
    return {
        "to": NUMBERS[n % len(NUMBERS)],
        "from": sender,
        "body": f"Your order #{n} has shipped and will arrive tomorrow.",
        "metadata": {"order_id": str(n)},
    }


@dataclass
class Results:
    """What the client saw."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    messages: int = 0


class Connection:
    """One keep-alive connection sending one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a ready-made request; the status and body of the response."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        """Close the socket."""
        if self.writer is not None:
            self.writer.close()


class Load:
    """Builds the requests of one run and records their outcomes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.counter = itertools.count()
        self.results = Results()

    def next_request(self) -> tuple[bytes, int]:
        """The next request, ready to send, and how many messages it carries."""
        n = next(self.counter)
        if self.args.batch:
            start = n * self.args.batch
            payload: Any = {
                "messages": [
                    message(i, self.args.sender) for i in range(start, start + self.args.batch)
                ]
            }
            carried = self.args.batch
        else:
            payload, carried = message(n, self.args.sender), 1
        body = json.dumps(payload).encode()
        headers = [
            f"POST {self.args.path} HTTP/1.1",
            f"host: {self.args.host}:{self.args.port}",
            "content-type: application/json",
            f"authorization: Bearer {self.args.key}",
            f"content-length: {len(body)}",
        ]
        if self.args.idempotency:
            headers.append(f"idempotency-key: {uuid.uuid4()}")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + body, carried

    def record(self, status: int, body: bytes, carried: int, latency: float) -> None:
        """Note one response (and the accepted messages' ids, when asked)."""
        self.results.statuses[status] += 1
        self.results.latencies.append(latency)
        if status >= 300:
            if self.results.statuses[status] <= 3:
                sys.stderr.write(f"HTTP {status}: {body[:500]!r}\n")
            return
        if not self.args.ids:
            self.results.messages += carried
            return
        payload = json.loads(body)
        if "data" in payload:
            accepted = [
                item["message"]["id"] for item in payload["data"] if item["status"] == "accepted"
            ]
        else:
            accepted = [payload["id"]]
        self.results.ids.extend(accepted)
        self.results.messages += len(accepted)

    async def closed_loop(self) -> float:
        """`concurrency` connections back to back; the elapsed time."""
        deadline = time.perf_counter() + self.args.duration
        remaining = self.args.count or sys.maxsize

        async def run() -> None:
            nonlocal remaining
            connection = Connection(self.args.host, self.args.port)
            try:
                while time.perf_counter() < deadline and remaining > 0:
                    remaining -= 1
                    raw, carried = self.next_request()
                    started = time.perf_counter()
                    status, body = await connection.request(raw)
                    self.record(status, body, carried, time.perf_counter() - started)
            finally:
                connection.close()

        started = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(self.args.concurrency)))
        return time.perf_counter() - started

    async def open_loop(self) -> float:
        """`rate` requests a second on schedule, over a pool of connections; the elapsed time."""
        pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(self.args.concurrency):
            pool.put_nowait(Connection(self.args.host, self.args.port))
        interval = 1.0 / self.args.rate
        total = int(self.args.duration * self.args.rate)
        started = time.perf_counter()

        async def one(scheduled: float) -> None:
            connection = await pool.get()
            try:
                raw, carried = self.next_request()
                status, body = await connection.request(raw)
                self.record(status, body, carried, time.perf_counter() - scheduled)
            finally:
                pool.put_nowait(connection)

        tasks = []
        for i in range(total):
            scheduled = started + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        while not pool.empty():
            pool.get_nowait().close()
        return elapsed


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One run, as the JSON the benchmark reads."""
    load = Load(args)
    elapsed = await (load.open_loop() if args.rate else load.closed_loop())
    results = load.results
    return {
        "requests": len(results.latencies),
        "messages": results.messages,
        "statuses": dict(results.statuses),
        "elapsed": elapsed,
        "requests_per_second": len(results.latencies) / elapsed,
        "messages_per_second": results.messages / elapsed,
        "p50_ms": percentile(results.latencies, 0.50) * 1000,
        "p99_ms": percentile(results.latencies, 0.99) * 1000,
        "ids": results.ids,
    }


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/messages")
    parser.add_argument("--key", default="")
    parser.add_argument("--sender", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0, help="stop after this many requests")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop at this rate")
    parser.add_argument("--batch", type=int, default=0, help="messages per batch request")
    parser.add_argument("--idempotency", action="store_true", help="an Idempotency-Key each")
    parser.add_argument("--ids", action="store_true", help="report accepted message ids")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args))
    write_all(sys.stdout.fileno(), (json.dumps(result) + "\n").encode())


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd`, waiting while the pipe is full.

    The event loop can leave stdout non-blocking, and setting it back did not always hold: a
    large result (a pickup run's ids) was then cut short at the pipe's 64 KiB, whole runs lost.
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


if __name__ == "__main__":
    main()
