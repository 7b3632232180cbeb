"""Helpers for the events tests: a real HTTP receiver on 127.0.0.1 whose answers a test scripts,
an independent Standard Webhooks verifier, settings that allow a local receiver, and a real arq
events worker run in burst mode."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker

from app.kernel.settings import EventsSettings
from app.worker.events import EventsWorkerSettings
from app.worker.queue import EVENTS_QUEUE
from tests.conftest import TEST_REDIS_URL, make_settings

# ---- An independent implementation of the Standard Webhooks verification, from the spec ----

TOLERANCE_SECONDS = 5 * 60


def verify_standard_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> bool:
    """What a receiver does (standardwebhooks.com): HMAC-SHA256 with the base64-decoded part of
    the `whsec_` secret over `{webhook-id}.{webhook-timestamp}.{body}`; any `v1,` entry of the
    space-separated `webhook-signature` may match; the timestamp within 5 minutes of now."""
    lower = {name.lower(): value for name, value in headers.items()}
    msg_id, timestamp = lower["webhook-id"], lower["webhook-timestamp"]
    if abs((now if now is not None else time.time()) - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :])
    content = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = hmac.new(key, content, hashlib.sha256).digest()
    for entry in lower["webhook-signature"].split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(signature), expected):
            return True
    return False


# ---- A receiver ----


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)


Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def respond(
    status: int = 204, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> Answer:
    """Answer with `status` at once."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()

    return answer


def hang() -> Answer:
    """Never answer."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    return answer


def drop() -> Answer:
    """Close the connection without answering."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        return None

    return answer


def drip(status: int = 200, interval: float = 0.05) -> Answer:
    """Send the status line at once, then a body one byte at a time, forever."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status} OK\r\nContent-Length: 100000000\r\n\r\n".encode())
        await writer.drain()
        while True:
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(interval)

    return answer


def flood(status: int = 200, size: int = 64 * 1024 * 1024) -> Answer:
    """Send a huge body as fast as the client reads it."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status} OK\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"y" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    return answer


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1: the scripted answers first, then `default`."""

    answers: deque[Answer] = field(default_factory=deque)
    default: Answer = field(default_factory=respond)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        """This receiver's URL."""
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> Receiver:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop the connections still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until `count` requests arrived."""
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                await asyncio.sleep(0.01)
        return self.received

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received.append(Received(method, path, headers, body, time.monotonic()))
            answer = self.answers.popleft() if self.answers else self.default
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connecting is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---- Settings and the events worker ----


def events_settings(**overrides: Any) -> EventsSettings:
    """Events settings that allow http to a receiver on this machine, with short timeouts and
    backoff (tests override what they look at)."""
    values: dict[str, Any] = {
        "allow_http": True,
        "allowed_networks": ["127.0.0.0/8", "::1/128"],
        "timeout_seconds": 2.0,
        "connect_timeout_seconds": 1.0,
        "retry_base_delay_seconds": 0.02,
        "retry_max_delay_seconds": 0.1,
        "retry_window_seconds": 30,
    }
    values.update(overrides)
    return EventsSettings(**values)


async def run_events_worker(
    events: EventsSettings | None = None,
    *,
    max_jobs: int = 10,
    stop: asyncio.Event | None = None,
    **ctx_extra: Any,
) -> None:
    """Run a real arq events worker: in burst mode until its queue is empty (deferred jobs
    included), or, given `stop`, until it is set and the jobs running then have finished."""
    ctx: dict[str, Any] = {
        "settings": make_settings(events=events or events_settings()),
        **ctx_extra,
    }
    worker = Worker(
        functions=EventsWorkerSettings.functions,
        queue_name=EVENTS_QUEUE,
        on_startup=EventsWorkerSettings.on_startup,
        on_shutdown=EventsWorkerSettings.on_shutdown,
        redis_settings=RedisSettings.from_dsn(TEST_REDIS_URL),
        burst=stop is None,
        poll_delay=0.01,
        handle_signals=False,
        keep_result=EventsWorkerSettings.keep_result,
        max_tries=EventsWorkerSettings.max_tries,
        job_timeout=EventsWorkerSettings.job_timeout,
        max_jobs=max_jobs,
        ctx=ctx,
    )

    async def stop_when_asked(stop: asyncio.Event) -> None:
        # No cancelling (it could cut arq off in the middle of its Redis bookkeeping): no more
        # jobs are picked, and the main loop returns once the running ones are done.
        await stop.wait()
        worker.allow_pick_jobs = False
        worker.burst, worker.max_burst_jobs = True, 0

    watcher = asyncio.create_task(stop_when_asked(stop)) if stop is not None else None
    try:
        await worker.main()
    finally:
        if watcher is not None:
            watcher.cancel()
        await worker.close()
