"""Structured logs: one JSON object a line, carrying the request id and the message id.

The API sets `request_id` per request (from `X-Request-ID` when the caller sends a sane one);
code that works on a message sets `message_id` (the worker per job, the API when it accepts or a
callback updates one), so every line about a message can be found from the API to the provider
call to the callback. Message bodies and secrets are not logged (bodies only with
`LOG_MESSAGE_BODIES=true`), and unless that is set `RedactingFilter` also keeps phone numbers
and query strings out of every line, whoever wrote it (uvicorn's access log, a library's error).
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

# A phone number as stored (E.164) or as providers write it (Vonage's `msisdn`, digits only):
# 8 to 15 digits, optionally after '+', not inside a longer word or number (ids, SIDs, hashes).
_PHONE_NUMBER = re.compile(r"(?<![\w+])\+?\d{8,15}(?![\w])")
# An opt-out resource's path names the number: /v1/opt-outs/{phone}.
_OPT_OUT_PATH = re.compile(r"(/v1/opt-outs/)(?!import\b)[^/?\s]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` without phone numbers (and the number in an opt-out path)."""
    return _PHONE_NUMBER.sub(REDACTED, _OPT_OUT_PATH.sub(r"\1" + REDACTED, text))


def without_query(path: str) -> str:
    """A request target without its query string: webhooks carry customers' numbers and text
    and Vonage's `api-key` there, lists their filters."""
    head, mark, _ = path.partition("?")
    return head + ("?" + REDACTED if mark else "")


def describe_error(error: BaseException) -> dict[str, str]:
    """What a log line may say of a database or driver error: its class and SQLSTATE, never its
    message (asyncpg quotes the value it could not encode; PostgreSQL's detail quotes keys)."""
    orig = getattr(error, "orig", None) or error
    described = {"error": f"{type(error).__name__}({type(orig).__name__})"}
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        described["sqlstate"] = str(sqlstate)
    return described


class RedactingFilter(logging.Filter):
    """Keeps customers' data and credentials out of every line that reaches the handler: the
    query strings of uvicorn's access log, phone numbers in messages and extras, and the
    parameters of failed SQL statements in exceptions (the engine hides them as well)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drop it."""
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            # ('%s - "%s %s HTTP/%s" %d', client, method, path with query, version, status):
            # the path and the client (a forwarded address when proxy headers are trusted) are
            # what can carry anything; each is redacted once, not the whole line again.
            client, method, path, version, status = args
            path = redact(without_query(str(path)))
            record.msg = record.msg % (redact(str(client)), method, path, version, status)
        else:
            record.msg = redact(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback is rendered here so that its text can be redacted too; the
            # exception's message may quote a statement's parameters or a provider's answer.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


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
        elif record.exc_text:
            line["exc"] = record.exc_text
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
        elif record.exc_text:  # rendered (and redacted) by RedactingFilter
            line += "\n" + record.exc_text
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


def logging_config(level: str, fmt: str, *, redact: bool = True) -> dict[str, Any]:
    """A `dictConfig` sending every logger (ours, uvicorn's, arq's) to stdout in `fmt`, through
    `RedactingFilter` unless `redact` is off (`LOG_MESSAGE_BODIES=true`)."""
    formatter: dict[str, Any] = {"()": JsonFormatter if fmt == "json" else TextFormatter}
    quiet = level.upper() != "DEBUG"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"quiet": {"()": QuietRoutineFilter}, "redact": {"()": RedactingFilter}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
                "filters": (["quiet"] if quiet else []) + (["redact"] if redact else []),
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


def configure_logging(level: str, fmt: str, *, redact: bool = True) -> None:
    """Apply `logging_config` to this process.

    Records do not look up their caller's file and line, thread or process (no formatter
    prints them): the stack walk alone was a sixth of an access log line's cost, paid on
    every request (the logging HOWTO's "Optimization" settings).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.config.dictConfig(logging_config(level, fmt, redact=redact))


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
