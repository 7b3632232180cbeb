"""A cap on request bodies, so no client (or forged webhook) can make us buffer without bound;
and the last line of defence against an error nothing else handled."""

from __future__ import annotations

import logging
import traceback

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kernel.logs import describe_error

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413: at once when Content-Length says so, else as
    soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a receive channel that counts what it delivers."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, counting_receive, send)

    def _detail(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await _send_problem(send, 413, "Content Too Large", "request_too_large", self._detail())


async def _send_problem(send: Send, status: int, title: str, code: str, detail: str) -> None:
    from app.kernel.errors import PROBLEM_JSON, Problem

    body = (
        Problem(title=title, status=status, code=code, detail=detail)
        .model_dump_json(exclude_none=True)
        .encode()
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class UnhandledErrors:
    """Answer an error nothing else handled with a problem+json 500, and keep it from the
    server: uvicorn closes a keep-alive connection after any exception, even one raised after
    the response was sent, and its log line would carry the exception's text (which may quote
    customers' data). The error is logged here by class and place; with `verbose`
    (`LOG_MESSAGE_BODIES`) its message and traceback too."""

    def __init__(self, app: ASGIApp, *, verbose: bool = False) -> None:
        self.app = app
        self.verbose = verbose

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; turn an exception into a 500 (or nothing, once answered)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as error:
            self._log(scope, error)
            if not started:
                await _send_problem(send, 500, "Internal Server Error", "internal_error",
                                    "something went wrong on our side; nothing you sent is at "
                                    "fault, and it may be retried")  # fmt: skip

    def _log(self, scope: Scope, error: Exception) -> None:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        extra = {**describe_error(error), "where": where, "path": scope.get("path", "")}
        if self.verbose:
            log.error("unhandled error", extra=extra, exc_info=error)
        else:
            log.error("unhandled error", extra=extra)
