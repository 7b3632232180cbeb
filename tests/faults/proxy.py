"""A small TCP proxy (asyncio, in the test process) that can drop and delay connections.

Put in front of PostgreSQL, Redis and the provider: `reset()` cuts every open connection (as a
network blip or a restarted load balancer would), `refuse_for()` closes new connections as soon as
they arrive, `delay_for()` holds every chunk of data for a while in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class TcpProxy:
    """127.0.0.1:`listen_port` -> 127.0.0.1:`target_port`, with faults on demand."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refuse_until = 0.0
        self._delay_until = 0.0
        self._delay = 0.0
        self.connections = 0
        self.resets = 0

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)

    async def stop(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
            self.reset()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def reset(self) -> None:
        """Cut every open connection now (both sides see it closed)."""
        self.resets += 1
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        self._writers.clear()

    def refuse_for(self, seconds: float) -> None:
        """Close new connections on arrival for `seconds`."""
        self._refuse_until = time.monotonic() + seconds

    def delay_for(self, seconds: float, delay: float) -> None:
        """Hold each chunk `delay` seconds, for the next `seconds`."""
        self._delay, self._delay_until = delay, time.monotonic() + seconds

    async def _handle(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        if time.monotonic() < self._refuse_until:
            client.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target_port), 5
            )
        except (TimeoutError, OSError):
            client.transport.abort()
            return
        self._writers.update((client, upstream))
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream), self._pipe(upstream_reader, client)
            )
        finally:
            for writer in (client, upstream):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if time.monotonic() < self._delay_until:
                    await asyncio.sleep(self._delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # Half-close is not needed by any of our protocols: end both directions.
            writer.transport.abort()
