"""The provider client's transport (aiohttp's pool behind httpx's API) against real local
sockets: what failed before sending stays retryable, anything after stays an unknown outcome."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from app.providers.base import ErrorKind, ProviderError, post_form
from app.providers.registry import AiohttpTransport, build_http_client
from tests.conftest import make_settings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
FORM = {"To": "+14155550123", "From": "72345", "Body": "hi"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    client = build_http_client(
        make_settings(provider_connect_timeout_seconds=0.5, provider_read_timeout_seconds=0.5)
    )
    yield client
    await client.aclose()


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/Messages.json"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)


async def send_error(http: httpx.AsyncClient, url: str) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await post_form(http, "twilio", url, FORM)
    return caught.value


def test_the_built_client_sends_through_aiohttp() -> None:
    client = build_http_client(make_settings(worker_concurrency=37))
    transport = client._transport
    assert isinstance(transport, AiohttpTransport)
    assert transport.limits.max_connections == 37  # one connection per call in flight


async def test_a_response_arrives_whole(http: httpx.AsyncClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 201 Created\r\ncontent-length: 12\r\n\r\n{"sid":"SM"}')
        await writer.drain()

    server, url = await serve(answer)
    async with server:
        response = await post_form(http, "twilio", url, FORM)
    assert response.status_code == 201
    assert response.json() == {"sid": "SM"}


async def test_a_refused_connection_is_retryable(http: httpx.AsyncClient) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await send_error(http, f"http://127.0.0.1:{port}/Messages.json")
    assert error.kind is ErrorKind.RETRYABLE
    assert error.provider_fault
    assert isinstance(error.__cause__, httpx.ConnectError)


async def test_a_connect_timeout_is_retryable(http: httpx.AsyncClient) -> None:
    # A listener that never accepts: once its backlog is full, the kernel leaves new
    # connections unanswered, so connecting takes until the connect timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        try:
            error = await send_error(http, f"http://127.0.0.1:{port}/Messages.json")
        finally:
            for filler in fillers:
                filler.close()
    assert error.kind is ErrorKind.RETRYABLE
    assert isinstance(error.__cause__, httpx.ConnectTimeout)


async def test_a_read_timeout_is_an_unknown_outcome(http: httpx.AsyncClient) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up and closes

    server, url = await serve(never_answer)
    async with server:
        error = await send_error(http, url)
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME
    assert isinstance(error.__cause__, httpx.ReadTimeout)


async def test_a_connection_dropped_after_sending_is_an_unknown_outcome(
    http: httpx.AsyncClient,
) -> None:
    # httpx-aiohttp alone names this a ConnectTimeout, which would be retried as "not sent".
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server, url = await serve(hang_up)
    async with server:
        error = await send_error(http, url)
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME
    assert isinstance(error.__cause__, httpx.RemoteProtocolError)


async def test_a_body_cut_short_is_an_unknown_outcome(http: httpx.AsyncClient) -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n{")
        await writer.drain()

    server, url = await serve(cut_short)
    async with server:
        error = await send_error(http, url)
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME
    assert isinstance(error.__cause__, httpx.ReadError)


@pytest.mark.parametrize(
    "answer",
    [
        b"GARBAGE\r\n\r\n",  # not an HTTP status line
        b"HTTP/1.1 201 Created\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["bad-status-line", "oversized-header"],
)
async def test_a_malformed_answer_after_the_request_went_out_is_an_unknown_outcome(
    http: httpx.AsyncClient, answer: bytes
) -> None:
    """aiohttp raises these without the package mapping them: they must still be named as
    httpx names a protocol error, so the message is never resent blindly (nor a 500/crash)."""

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    server, url = await serve(malformed)
    try:
        error = await send_error(http, url)
    finally:
        server.close()
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME
