"""The HTTP edge of `smsgate serve`: uvicorn, with limits uvicorn itself does not have.

uvicorn's httptools protocol reads request headers without a size limit (an 8 MiB header was
buffered whole before the 401) and gives a slow client all the time it wants to send its head
and its body. `GuardedHttpToolsProtocol` adds, per connection (README, "HTTP limits"):

* a cap on the request line and headers together (`HTTP_MAX_HEADER_BYTES`): 431 and close;
* a deadline for them (`HTTP_HEADER_TIMEOUT_SECONDS`, from the connection, or from the first
  byte of a following request on a keep-alive connection): 408 and close;
* a deadline for the body once the head is in (`HTTP_BODY_TIMEOUT_SECONDS`): 408 and close.

uvicorn's own settings do the rest: `timeout_keep_alive` (`HTTP_KEEP_ALIVE_SECONDS`) closes idle
keep-alive connections and `limit_concurrency` (`HTTP_MAX_CONCURRENCY`) answers 503 past that
many connections and requests at once in one process.

The protocol also writes each response's head and body in one system call
(`_CoalescingTransport`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.kernel.settings import Settings, get_settings


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one connection may cost us (see the module's docstring)."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        """The limits the settings give."""
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
        )


class _HeadTooLarge(Exception):
    """Raised from the parser's callback to stop it: the head is over the limit."""


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    """A whole problem+json response that closes the connection (nothing of the request is
    read after it, so the connection cannot be reused)."""
    body = (
        f'{{"type":"about:blank","title":"{reason}","status":{status},'
        f'"code":"{reason.lower().replace(" ", "_")}","detail":"{detail}"}}'
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


# The most a `_CoalescingTransport` holds back: a small answer is joined, a large one goes out.
_HOLD_BYTES: Final = 64 * 1024


class _CoalescingTransport:
    """A transport whose writes made in one turn of the event loop leave as one.

    uvicorn writes a response's head and its body separately: two `send` system calls and two
    segments to the client for every answer. Here they are joined and written at the end of the
    turn (`call_soon`), so a whole small response is one call. Everything but writing and
    closing is the real transport's.
    """

    __slots__ = ("_held", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._held = 0

    def write(self, data: bytes) -> None:
        """Queue `data` for the end of this turn of the loop (at once past `_HOLD_BYTES`: a body
        streamed without pause must reach the real transport, whose buffer limits pause it)."""
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data) if not isinstance(data, bytes) else data)
        self._held += len(data)
        if self._held > _HOLD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._held = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        """Write what is queued, then close (as a transport's close does with its buffer)."""
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size cap and header and body deadlines."""

    # None: read from the settings of the process (each `serve --workers` process reads its own).
    limits: ClassVar[HttpLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.limits or HttpLimits.of(get_settings())
        self._in_head = True
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's head (a silent connection is closed too)."""
        super().connection_made(transport)
        self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm(self._limits.header_timeout, "the request headers took too long")

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, refusing a head over the limit before it is buffered whole."""
        self._unset_keepalive_if_required()
        if self._in_head:
            if self._deadline is None:  # the first byte of a request on a kept-alive connection
                self._arm(self._limits.header_timeout, "the request headers took too long")
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse_head()
                return
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, _HeadTooLarge):
                self._refuse_head()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._in_head and self._head_bytes > self._limits.max_header_bytes:
            self._refuse_head()

    def on_headers_complete(self) -> None:
        """The head is in: check its exact size, then give the body its own deadline."""
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._limits.max_header_bytes:
            raise _HeadTooLarge
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        self._arm(self._limits.body_timeout, "the request body took too long")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The whole request is in: no deadline until the next one starts."""
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, reason: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started and not self._in_head
        if not answered:
            self.transport.write(_raw_response(408, "Request Timeout", reason))
        self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            detail = f"the request line and headers are over {self._limits.max_header_bytes} bytes"
            self.transport.write(_raw_response(431, "Request Header Fields Too Large", detail))
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run()/Config() keyword arguments for the limits in `settings`."""
    return {
        "http": GuardedHttpToolsProtocol,
        "timeout_keep_alive": settings.http_keep_alive_seconds,
        "limit_concurrency": settings.http_max_concurrency,
    }
