"""A PostgreSQL that is restarting answers "the database system is starting up" (SQLSTATE
57P03): the API says 503 with Retry-After, as for one that is down, not 500."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.api.test_send import assert_problem
from tests.conftest import World

SSL_REQUEST = 80877103


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(
        code + value.encode() + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


@pytest.fixture
async def starting_postgres() -> AsyncIterator[int]:
    """A port where "PostgreSQL" refuses every connection because it is starting up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                payload = await reader.readexactly(length - 4)
                if struct.unpack("!i", payload[:4])[0] == SSL_REQUEST:
                    writer.write(b"N")  # no TLS; the startup message follows
                    continue
                writer.write(_error_response("57P03", "the database system is starting up"))
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_database_that_is_starting_up_is_a_503(
    app_factory: Any, world: World, starting_postgres: int
) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{starting_postgres}/smsgate"
    async with app_factory(database_url=url) as api:
        response = await api.post(
            "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth()
        )

    assert_problem(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "5"
