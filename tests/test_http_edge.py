"""The HTTP edge as `smsgate serve` runs it (uvicorn with app.web.server's protocol), over real
sockets: header size cap (431), header and body deadlines (408), and a connection kept alive
after an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import pytest
import uvicorn
from redis.asyncio import Redis

from app.main import create_app
from app.web.server import GuardedHttpToolsProtocol, HttpLimits, uvicorn_options
from tests.conftest import World, make_settings
from tests.processes import free_port

LIMITS = HttpLimits(max_header_bytes=4096, header_timeout=0.5, body_timeout=0.5)


class SmallLimits(GuardedHttpToolsProtocol):
    """The service's protocol with limits a test can reach quickly."""

    limits = LIMITS


class _WriteRecorder:
    """The socket's transport, noting each write that reaches it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RecordingWrites(SmallLimits):
    """SmallLimits, recording what reaches the socket's transport."""

    writes: ClassVar[list[bytes]] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WriteRecorder(transport, self.writes))  # type: ignore[arg-type]


@asynccontextmanager
async def serving(
    protocol: type[GuardedHttpToolsProtocol] = SmallLimits, **overrides: Any
) -> AsyncIterator[int]:
    """The app served by uvicorn on a free loopback port, as `smsgate serve` configures it."""
    settings = make_settings(**overrides)
    port = free_port()
    options = {**uvicorn_options(settings), "http": protocol}
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, **options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response (status, body) read off the connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return status, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF within a few seconds)."""
    return await asyncio.wait_for(reader.read(), 5) == b""


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close our end and wait for it."""
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server closed first


@pytest.fixture
def edge(database: str, redis: Redis) -> Callable[..., Any]:
    """`serving`, once the test database and Redis are ready."""
    return serving


async def test_headers_over_the_limit_are_refused_with_431_before_they_are_read_whole(
    edge: Callable[..., Any],
) -> None:
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        refused_after = 0
        for _ in range(64):  # up to 64 KiB, sent as a slow client would
            writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            refused_after += 1010
            await writer.drain()
            await asyncio.sleep(0.005)
            if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                break
        status, body = await read_response(reader)
        assert await closed(reader)
        await shut(writer)

    assert status == 431
    assert b"request_header_fields_too_large" in body
    assert refused_after < 16 * 1024  # refused near the limit, not after the whole head


async def test_a_head_over_the_limit_in_one_piece_is_refused_too(
    edge: Callable[..., Any],
) -> None:
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n")
        status, _ = await read_response(reader)
        await shut(writer)

    assert status == 431


async def test_a_head_within_the_limit_and_a_large_body_are_served(
    edge: Callable[..., Any], world: World
) -> None:
    body = b'{"body": "' + b"a" * 9_000 + b'"}'
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/messages/preview HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {world.client_key}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, _ = await read_response(reader)
        await shut(writer)

    assert status == 200


async def test_a_head_that_takes_too_long_is_answered_408_and_closed(
    edge: Callable[..., Any],
) -> None:
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, body = await read_response(reader)
        assert await closed(reader)
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        # A connection that sends nothing is answered and closed too.
        silent = await asyncio.wait_for(silent_reader.read(), 5)
        await shut(writer)
        await shut(silent_writer)

    assert status == 408
    assert b"request_timeout" in body
    assert silent.startswith(b"HTTP/1.1 408 ")


async def test_a_body_that_takes_too_long_is_answered_408_and_closed(
    edge: Callable[..., Any], world: World
) -> None:
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {world.client_key}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n{"
        )
        status, _ = await read_response(reader)
        assert await closed(reader)
        await shut(writer)

    assert status == 408


async def test_the_connection_is_kept_alive_after_an_error(
    edge: Callable[..., Any], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.sending import routes as messages

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(messages, "accept_messages", broken)
    body = b'{"to": "+14155550123", "body": "hi"}'
    request = (
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {world.client_key}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    async with edge() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        failed, problem = await read_response(reader)
        invalid = b'{"to": "+1415555CALL", "body": "hi"}'
        writer.write(request.replace(body, invalid))
        refused, _ = await read_response(reader)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        healthy, _ = await read_response(reader)
        await shut(writer)

    assert failed == 500 and b"internal_error" in problem
    assert refused == 422
    assert healthy == 200  # the same connection, three requests


async def test_a_response_head_and_body_reach_the_socket_in_one_write(
    edge: Callable[..., Any],
) -> None:
    """uvicorn writes a head and then a body: two system calls per answer, which the protocol
    joins into one. Two requests on one connection: one write each, in order, whole."""
    RecordingWrites.writes.clear()
    async with edge(RecordingWrites) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await read_response(reader)
        writer.write(b"GET /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n")  # no key: 401
        second = await read_response(reader)
        await shut(writer)

    assert (first[0], second[0]) == (200, 401)
    assert len(RecordingWrites.writes) == 2
    assert [write.split(b" ", 2)[1] for write in RecordingWrites.writes] == [b"200", b"401"]
    assert RecordingWrites.writes[0].endswith(first[1])
    assert RecordingWrites.writes[1].endswith(second[1])


def test_a_large_or_streamed_answer_is_not_held_back() -> None:
    """The coalescing transport joins a small answer's writes, but past 64 KiB it hands what it
    holds to the real transport at once: a body streamed without pause must meet the real
    transport's buffer limits, not pile up in ours."""
    from app.web.server import _HOLD_BYTES, _CoalescingTransport

    class Real:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return False

    loop = asyncio.new_event_loop()
    try:
        real = Real()
        transport = _CoalescingTransport(real, loop)  # type: ignore[arg-type]
        transport.write(b"head")
        transport.write(b"small body")
        assert real.writes == []  # held for the end of the loop's turn
        chunk = b"x" * (_HOLD_BYTES // 2)
        for _ in range(3):
            transport.write(chunk)
        assert len(real.writes) == 1 and real.writes[0].startswith(b"headsmall body")
        loop.call_soon(loop.stop)
        loop.run_forever()  # the end of the turn: the rest goes out
        assert b"".join(real.writes) == b"headsmall body" + chunk * 3
    finally:
        loop.close()
