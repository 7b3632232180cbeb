"""Which transport the provider client should use, by the numbers: `python -m bench.transports`.

Starts the fake Twilio (bench.fake_twilio) in a process of its own, then, in this one process
and one after the other, POSTs the same CreateMessage form with each client at the same
concurrency: httpx's default pool, the service's former `PooledTransport` (pools of 10), the
`httpx-aiohttp` transport behind httpx's API (as `build_http_client` builds it), and plain
aiohttp (no httpx at all: the floor). Prints, per client, messages a second and this process's
CPU per request (`time.process_time`, so the fake's CPU is not counted), as a table or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import httpx

from app.providers.registry import AiohttpTransport
from bench.__main__ import free_port, listening, wait_until

FORM = {"To": "+14155550123", "From": "72345", "Body": "Your order #1042 has shipped."}
Post = Callable[[], Awaitable[int]]


# Connections per pool of `PooledTransport`.
CONNECTIONS_PER_POOL: Final = 10


class PooledTransport(httpx.AsyncBaseTransport):
    """The service's provider transport before `AiohttpTransport`, kept to be measured beside
    it: several small connection pools instead of one large one, each request to the least busy.

    httpcore looks at every connection of its pool on each request (for a free one, and for
    expired ones, with a system call each), so with a hundred calls in flight one pool spends
    more time looking than sending; in pools of ten it does not.
    """

    def __init__(self, connections: int, **options: Any) -> None:
        count = max(1, -(-connections // CONNECTIONS_PER_POOL))
        size = -(-connections // count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits, **options) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send on the pool with the fewest requests in flight."""
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        # The connection stays busy until the body is read and the response closed.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self._busy[index] -= 1

    async def aclose(self) -> None:
        """Close every pool."""
        for pool in self._pools:
            await pool.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that calls `on_close` once, when closed."""

    def __init__(self, stream: httpx.AsyncByteStream, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Callable[[], None] | None = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


@dataclass
class Figure:
    """One client's run."""

    client: str
    requests: int
    failures: int
    seconds: float
    cpu_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Rate and CPU per request, for the table and the JSON."""
        return {
            "client": self.client,
            "requests": self.requests,
            "failures": self.failures,
            "messages_per_second": self.requests / self.seconds,
            "cpu_ms_per_request": self.cpu_seconds / self.requests * 1000,
        }


async def timed(name: str, post: Post, requests: int, concurrency: int) -> Figure:
    """`requests` calls of `post` from `concurrency` tasks; wall and CPU time."""
    pending = iter(range(requests))
    failures = 0

    async def run() -> None:
        nonlocal failures
        for _ in pending:
            failures += await post() != 201

    # A warm-up round opens the connections, so every client is measured on a full pool.
    await asyncio.gather(*(post() for _ in range(concurrency)))
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    return Figure(name, requests, failures, time.perf_counter() - wall, time.process_time() - cpu)


def httpx_client(kind: str, concurrency: int) -> httpx.AsyncClient:
    """An httpx client with the transport `kind`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport: httpx.AsyncBaseTransport
    if kind == "httpx default pool":
        transport = httpx.AsyncHTTPTransport(limits=limits)
    elif kind == "httpx PooledTransport":
        transport = PooledTransport(concurrency)
    else:
        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(transport=transport, timeout=10.0)


async def measure(url: str, auth: tuple[str, str], requests: int, concurrency: int) -> list[Figure]:
    """Every client, one after the other."""
    figures = []
    for kind in ("httpx default pool", "httpx PooledTransport", "httpx + httpx-aiohttp"):
        async with httpx_client(kind, concurrency) as client:

            async def post(client: httpx.AsyncClient = client) -> int:
                response = await client.post(url, data=FORM, auth=auth)
                return response.status_code

            figures.append(await timed(kind, post, requests, concurrency))
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": aiohttp.encode_basic_auth(*auth)}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def plain() -> int:
            async with session.post(url, data=FORM) as response:
                await response.read()
                return response.status

        figures.append(await timed("plain aiohttp", plain, requests, concurrency))
    return figures


def main() -> None:
    """Start the fake, measure, print."""
    parser = argparse.ArgumentParser(prog="bench.transports", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="per client")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    port, sid, token = free_port(), "AC" + secrets.token_hex(16), secrets.token_hex(16)
    argv = ["--port", str(port), "--account-sid", sid, "--auth-token", token]
    fake = subprocess.Popen([sys.executable, "-m", "bench.fake_twilio", *argv])
    try:
        wait_until("the fake provider", lambda: listening(port), 20)
        url = f"http://127.0.0.1:{port}/2010-04-01/Accounts/{sid}/Messages.json"
        import uvloop

        results = [
            {"concurrency": concurrency} | figure.as_dict()
            for concurrency in args.concurrency
            for figure in uvloop.run(measure(url, (sid, token), args.requests, concurrency))
        ]
    finally:
        fake.terminate()
        fake.wait(10)
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
        return
    sys.stdout.write(
        f"{'client':<24}{'in flight':>10}{'msg/s':>10}{'CPU ms/req':>12}{'failed':>8}\n"
    )
    for row in results:
        sys.stdout.write(
            f"{row['client']:<24}{row['concurrency']:>10}{row['messages_per_second']:>10,.0f}"
            f"{row['cpu_ms_per_request']:>12.3f}{row['failures']:>8}\n"
        )


if __name__ == "__main__":
    main()
