"""What is logged: no message body, phone number, API key or provider credential in any line
unless LOG_MESSAGE_BODIES is set. Real processes (`smsgate serve`, `smsgate worker`) with their
own logging, through a send, a provider's refusal quoting the number, a signed Vonage inbound
GET carrying `api-key` in its query string; and a failing SQL statement in the API."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, text

from app.db.models import Message
from app.db.session import SessionFactory
from app.kernel.logs import JsonFormatter, RedactingFilter, logging_config
from tests.api.test_status_callbacks import vonage_signed
from tests.conftest import TEST_REDIS_URL as REDIS_URL
from tests.conftest import (
    TWILIO_SID,
    TWILIO_TOKEN,
    VONAGE_SIGNATURE_SECRET,
    World,
    owned_database_url,
)
from tests.processes import clean_env, free_port, start_smsgate, stop, wait_http_ok

BODY = "Your verification code is 604213, do not share it"
NUMBER = "+14155550123"
VONAGE_API_KEY = "vonage-api-key-7f3e"
VONAGE_API_SECRET = "vonage-api-secret-91ac"
# Its parcel number has letters no hex id has: a request id or a UUID never contains it.
INBOUND_TEXT = "Where is my parcel XK7731"


class _RefusingTwilio(http.server.BaseHTTPRequestHandler):
    """Twilio's answer to a number it will not text: a 400 whose message quotes the number."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps(
            {
                "code": 21211,
                "message": f"The 'To' number {NUMBER} is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            }
        ).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        """Quiet."""


@pytest.fixture
def refusing_twilio() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingTwilio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def forbidden_in(log: str) -> list[str]:
    """The secrets and personal data found in `log`."""
    needles = [BODY, "604213", NUMBER, NUMBER[1:], "4155550123", INBOUND_TEXT, "XK7731"]
    needles += [VONAGE_API_KEY, VONAGE_API_SECRET, TWILIO_TOKEN]
    return [needle for needle in needles if needle in log]


async def test_no_body_number_or_credential_reaches_the_logs_of_the_processes(
    world: World,
    redis: Redis,
    session_factory: SessionFactory,
    refusing_twilio: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=REDIS_URL,
        DB_POOL_SIZE="4",
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        TWILIO__ACCOUNT_SID=TWILIO_SID,
        TWILIO__AUTH_TOKEN=TWILIO_TOKEN,
        TWILIO__BASE_URL=refusing_twilio,
        VONAGE__API_KEY=VONAGE_API_KEY,
        VONAGE__API_SECRET=VONAGE_API_SECRET,
        VONAGE__SIGNATURE_SECRET=VONAGE_SIGNATURE_SECRET,
        VONAGE__SIGNATURE_METHOD="sha256",
        LOG_LEVEL="DEBUG",  # every line there is
    )
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    api = start_smsgate("serve", "--port", str(port), env=env, log=api_log)
    worker = start_smsgate("worker", env=env, log=worker_log)
    try:
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/healthz", api, api_log, 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            sent = await client.post(
                "/v1/messages", json={"to": NUMBER, "body": BODY}, headers=world.auth()
            )
            assert sent.status_code == 202, sent.text
            listed = await client.get("/v1/messages", params={"to": NUMBER}, headers=world.auth())
            assert listed.status_code == 200
            opted = await client.get(f"/v1/opt-outs/{NUMBER}", headers=world.auth(world.admin_key))
            assert opted.status_code == 200
            inbound = vonage_signed(
                {
                    "msisdn": NUMBER[1:],
                    "to": "ACME",
                    "messageId": "0A0000000123ABCD1",
                    "text": INBOUND_TEXT,
                    "type": "text",
                    "api-key": VONAGE_API_KEY,
                    "message-timestamp": "2026-11-26 10:00:00",
                }
            )
            received = await client.get(f"/v1/webhooks/vonage/inbound?{urlencode(inbound)}")
            assert received.status_code == 204, received.text

        async def failed() -> bool:
            async with session_factory() as session:
                status = await session.scalar(select(Message.status))
            return status == "failed"

        for _ in range(150):  # the worker submits, Twilio refuses, the message fails
            if await failed():
                break
            await asyncio.sleep(0.2)
        assert await failed()
    finally:
        stop(worker)
        stop(api)
    api_text, worker_text = api_log.read_text(), worker_log.read_text()

    assert "GET /v1/webhooks/vonage/inbound" in api_text  # the access log is on
    assert "provider submission failed" in worker_text  # the refusal was logged
    assert forbidden_in(api_text) == [], api_text
    assert forbidden_in(worker_text) == [], worker_text


async def test_a_failing_statement_logs_no_parameter(
    app_factory: Any, world: World, monkeypatch: pytest.MonkeyPatch, session_factory: SessionFactory
) -> None:
    """A statement PostgreSQL refuses, with a number and a body as its parameters, through the
    API's engine: its log lines (formatted as the processes write them) quote neither."""
    from app.sending import messages as domain

    async def failing(session: Any, *_: Any, **__: Any) -> Any:
        await session.execute(
            text("SELECT CAST(:number AS integer), CAST(:body AS integer)"),
            {"number": NUMBER, "body": BODY},
        )

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())  # no RedactingFilter: the engine itself must hide them
    logging.getLogger().addHandler(handler)
    try:
        monkeypatch.setattr(domain, "get_message", failing)
        async with app_factory() as api:
            response = await api.get(f"/v1/messages/{world.client_id}", headers=world.auth())
            monkeypatch.setattr(domain, "get_message", _raising_asyncpg_error)
            other = await api.get(f"/v1/messages/{world.client_id}", headers=world.auth())
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue()

    assert response.status_code == 422  # PostgreSQL's data exception: the input's fault
    assert other.status_code == 500
    assert "input the database refused" in lines and "unhandled error" in lines
    assert forbidden_in(lines) == [], lines


async def _raising_asyncpg_error(*_: Any, **__: Any) -> Any:
    import asyncpg

    raise asyncpg.exceptions.UniqueViolationError(
        f"duplicate key value: Key (phone)=({NUMBER}) already exists; body {BODY}"
    )


def test_the_filter_redacts_what_others_log() -> None:
    """uvicorn's access log with a query string, a library's message with a number in it, a
    traceback quoting one: through the processes' handler, none of it is left."""
    config = logging_config("INFO", "json")
    assert "redact" in config["handlers"]["stdout"]["filters"]
    assert (
        "redact"
        not in logging_config("INFO", "json", redact=False)["handlers"]["stdout"]["filters"]
    )
    records = [
        logging.LogRecord(
            "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", "GET", f"/v1/webhooks/vonage/inbound?api-key={VONAGE_API_KEY}"
             f"&msisdn={NUMBER[1:]}&text={INBOUND_TEXT}", "1.1", 204), None,
        ),
        logging.LogRecord(
            "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", "PUT", f"/v1/opt-outs/%2B{NUMBER[1:]}", "1.1", 200), None,
        ),
        logging.LogRecord("httpx", logging.WARNING, "", 0, "refused %s", (NUMBER,), None),
    ]  # fmt: skip
    try:
        raise ValueError(f"invalid input for query argument $1: '{NUMBER}'")
    except ValueError as error:
        failing = logging.LogRecord(
            "app", logging.ERROR, "", 0, "failed", None, (ValueError, error, error.__traceback__)
        )
    records.append(failing)
    redacting, formatter = RedactingFilter(), JsonFormatter()
    lines = "\n".join(formatter.format(r) for r in records if redacting.filter(r))

    assert forbidden_in(lines) == [], lines
    assert "/v1/webhooks/vonage/inbound?[redacted]" in lines
    assert "invalid input for query argument" in lines  # the rest of the traceback stays
