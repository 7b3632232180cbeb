"""Structured logs: one JSON object a line, carrying the request id and the message id.

The API sets `request_id` per request (from `X-Request-ID` when the caller sends a sane one);
code that works on a message sets `message_id` (the worker per job, the API when it accepts or a
callback updates one), so every line about a message can be found from the API to the provider
call to the callback. Message bodies and secrets are not logged (bodies only with
`LOG_MESSAGE_BODIES=true`).
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
message_id_var: ContextVar[str | None] = ContextVar("message_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured duplicate of the message
}
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its context and extras."""
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        message_id = message_id_var.get()
        if message_id is not None:
            line["message_id"] = message_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A log record as one line for a person: time, level, logger, message, then the context
    and extras as key=value (what `smsgate dev` shows in a terminal)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its context and extras."""
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        parts = [f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        context = {"request_id": request_id_var.get(), "message_id": message_id_var.get()}
        for key, value in [*context.items(), *record.__dict__.items()]:
            if value is not None and key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={value}")
        line = "  ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# arq's lines for a job starting (→) and succeeding (●); for the periodic sweeps they are most of
# an idle service's log (dozens a minute), with the health record each sweep changes. Failures,
# retries and timeouts are still logged.
_ARQ_JOB_LINES = frozenset({"%6.2fs → %s(%s)%s", "%6.2fs ← %s ● %s"})
_ARQ_HEALTH_LINE = "recording health: %s"


class QuietRoutineFilter(logging.Filter):
    """Drop arq's start and success lines of cron jobs and its health records (all kept at
    LOG_LEVEL=DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a routine line."""
        if record.msg == _ARQ_HEALTH_LINE:
            return False
        if record.msg not in _ARQ_JOB_LINES or not isinstance(record.args, tuple):
            return True
        return not str(record.args[1]).startswith("cron:")


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A `dictConfig` sending every logger (ours, uvicorn's, arq's) to stdout in `fmt`."""
    formatter: dict[str, Any] = {"()": JsonFormatter if fmt == "json" else TextFormatter}
    quiet = level.upper() != "DEBUG"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"quiet": {"()": QuietRoutineFilter}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
                "filters": ["quiet"] if quiet else [],
            }
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq")
        }
        # httpx logs every request's full URL at INFO: clients' webhook URLs carry tokens and
        # provider lookups carry phone numbers.
        | {name: {"level": "WARNING"} for name in ("httpx", "httpcore")}
        # Alembic's plugin set-up lines each time the API reads the schema's head revision.
        | {"alembic": {"level": "WARNING"}},
    }


def configure_logging(level: str, fmt: str) -> None:
    """Apply `logging_config` to this process."""
    logging.config.dictConfig(logging_config(level, fmt))


@contextmanager
def message_context(message_id: object) -> Iterator[None]:
    """Tag every log line in the block with the message's id."""
    token = message_id_var.set(str(message_id))
    try:
        yield
    finally:
        message_id_var.reset(token)


class RequestIdMiddleware:
    """Give every request an id (the caller's `X-Request-ID` if sane), log lines carry it, and
    the response returns it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request inside its id's context."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _SANE_REQUEST_ID.match(offered) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        message_token = message_id_var.set(None)  # nothing leaks from an earlier request

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            message_id_var.reset(message_token)
            request_id_var.reset(token)
