"""What operators see: Prometheus metrics, JSON logs with request and message ids, readiness."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import update

from app.db.models import Message
from app.db.session import SessionFactory
from app.delivery.circuit import CircuitPolicy, CircuitState, ProviderHealth
from app.delivery.pipeline import deliver_message
from app.kernel.logs import JsonFormatter, logging_config, message_context
from app.main import create_app
from app.providers.base import ErrorKind, ProviderError
from tests.api.test_status_callbacks import TWILIO_PATH
from tests.conftest import METRICS_TOKEN, PUBLIC_BASE_URL, World, make_settings
from tests.domain.test_delivery import (
    POLICY,
    RecordingProvider,
    make_due,
    queued_message,
    twilio_created,
    twilio_error,
)
from tests.test_end_to_end import run_worker

METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the JSON lines production writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_metrics_count_messages_by_status_provider_and_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    labels = {"provider": "fake", "sender": "+14155550199"}
    queued_before = sample("smsgate_messages_total", status="queued", **labels)
    delivered_before = sample("smsgate_messages_total", status="delivered", **labels)

    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "from": "+14155550199"},
        headers=world.auth(),
    )
    scrape = await api.get("/metrics", headers=METRICS_AUTH)

    assert response.status_code == 202
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert "smsgate_queue_depth 1.0" in scrape.text
    assert sample("smsgate_messages_total", status="queued", **labels) == queued_before + 1

    await run_worker()

    assert sample("smsgate_messages_total", status="delivered", **labels) == delivered_before + 1
    assert "smsgate_queue_depth 0.0" in (await api.get("/metrics", headers=METRICS_AUTH)).text


async def test_metrics_report_the_age_of_the_oldest_queued_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await queued_message(session_factory, world)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(created_at=datetime.now(UTC) - timedelta(minutes=10))
        )

    await api.get("/metrics", headers=METRICS_AUTH)

    age = sample("smsgate_oldest_queued_message_age_seconds")
    assert 600 <= age < 660


async def test_a_scheduled_message_is_as_old_as_its_send_at_once_queued(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Accepted three days ago for two minutes ago, promoted to `queued`: it waited by design,
    # so the gauge (and the SmsgateMessagesStuckQueued page) reads two minutes, not three days.
    await queued_message(session_factory, world)
    now = datetime.now(UTC)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(
                created_at=now - timedelta(days=3), send_at=now - timedelta(minutes=2)
            )
        )

    await api.get("/metrics", headers=METRICS_AUTH)

    age = sample("smsgate_oldest_queued_message_age_seconds")
    assert 120 <= age < 180


async def test_provider_latency_is_measured_per_outcome(
    session_factory: SessionFactory, world: World
) -> None:
    before = sample("smsgate_provider_request_seconds_count", provider="twilio", outcome="accepted")
    message_id = await queued_message(session_factory, world)

    await deliver_message(
        message_id, session_factory, RecordingProvider(twilio_created).providers(), POLICY
    )

    assert (
        sample("smsgate_provider_request_seconds_count", provider="twilio", outcome="accepted")
        == before + 1
    )


async def test_refused_webhook_signatures_are_counted(api: httpx.AsyncClient) -> None:
    before = sample("smsgate_webhook_verification_failures_total", provider="twilio", kind="status")

    await api.post(TWILIO_PATH, data={"MessageSid": "SM1", "MessageStatus": "delivered"})

    assert (
        sample("smsgate_webhook_verification_failures_total", provider="twilio", kind="status")
        == before + 1
    )


async def test_log_lines_are_json_with_the_request_and_message_ids(
    api: httpx.AsyncClient, world: World, json_logs: io.StringIO
) -> None:
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "Your code is 123456"},
        headers={**world.auth(), "X-Request-ID": "req-42"},
    )

    assert response.headers["x-request-id"] == "req-42"
    accepted = [line for line in lines(json_logs) if line["msg"] == "message accepted"]
    assert len(accepted) == 1
    assert accepted[0]["request_id"] == "req-42"
    assert accepted[0]["message_id"] == response.json()["id"]
    assert accepted[0]["level"] == "info"
    assert "123456" not in json_logs.getvalue()  # bodies stay out of logs by default


async def test_a_request_without_an_id_gets_one(api: httpx.AsyncClient) -> None:
    first = await api.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    second = await api.get("/healthz")

    assert len(first.headers["x-request-id"]) == 32
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_bodies_are_logged_only_when_configured(
    app_factory: Any, world: World, json_logs: io.StringIO
) -> None:
    async with app_factory(log_message_bodies=True) as api:
        await api.post(
            "/v1/messages", json={"to": "+14155550123", "body": "Order 77"}, headers=world.auth()
        )

    assert [line["body"] for line in lines(json_logs) if "body" in line] == ["Order 77"]


async def test_worker_and_callback_lines_carry_the_message_id(
    api: httpx.AsyncClient, world: World, json_logs: io.StringIO
) -> None:
    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth()
    )
    message_id = response.json()["id"]

    await run_worker(RecordingProvider(twilio_created))

    submitted = [line for line in lines(json_logs) if line["msg"] == "message submitted"]
    assert [line["message_id"] for line in submitted] == [message_id]
    assert submitted[0]["provider"] == "twilio"


async def test_not_ready_when_the_schema_is_behind_the_code(database: str, world: World) -> None:
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        app.state.schema_head = uuid.uuid4().hex[:12]  # a migration this database lacks
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_BASE_URL) as api:
            response = await api.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["migrations"].startswith("error: RuntimeError: schema at")


async def test_provider_throttling_is_counted_as_a_rate_limit_deferral(
    session_factory: SessionFactory, world: World
) -> None:
    before = sample(
        "smsgate_rate_limit_deferrals_total", provider="twilio", reason="provider_throttled"
    )
    message_id = await queued_message(session_factory, world)
    throttled = twilio_error(429, 20429, "Too Many Requests")
    failing = twilio_error(500, 20500, "Internal Server Error")

    outcome = await deliver_message(
        message_id, session_factory, RecordingProvider(throttled).providers(), POLICY
    )
    await make_due(session_factory, message_id)
    await deliver_message(
        message_id, session_factory, RecordingProvider(failing).providers(), POLICY
    )

    assert outcome.retry_in is not None  # deferred, not failed
    after = sample(
        "smsgate_rate_limit_deferrals_total", provider="twilio", reason="provider_throttled"
    )
    assert after == before + 1  # the 500 is a retry, but not a rate limit


def test_request_urls_from_httpx_stay_out_of_the_logs() -> None:
    config = logging_config("INFO", "json")

    # Webhook URLs carry clients' tokens; provider lookups carry phone numbers.
    assert config["loggers"]["httpx"]["level"] == "WARNING"
    assert config["loggers"]["httpcore"]["level"] == "WARNING"


def _configured(level: str, fmt: str) -> tuple[logging.Handler, logging.Formatter]:
    """The stdout handler `logging_config` describes, built for real by dictConfig (the root
    logger's handlers and level, pytest's among them, are put back)."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    logging.config.dictConfig(logging_config(level, fmt))
    try:
        (handler,) = root.handlers
        assert handler.formatter is not None
        return handler, handler.formatter
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)


def _arq_record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("arq.worker", logging.INFO, __file__, 1, msg, args, None)


def test_routine_cron_and_health_lines_are_dropped_and_everything_else_kept() -> None:
    handler, _ = _configured("INFO", "json")
    cron_start = _arq_record("%6.2fs → %s(%s)%s", 0.5, "cron:sweep:1795687200000:sweep", "", "")
    cron_done = _arq_record("%6.2fs ← %s ● %s", 0.01, "cron:sweep:1795687200000:sweep", "")
    health = _arq_record("recording health: %s", "Dec-04 j_complete=3")
    job_done = _arq_record("%6.2fs ← %s ● %s", 0.01, "4f1c:deliver", "")
    cron_failed = _arq_record("%6.2fs ! %s failed, %s: %s", 0.2, "cron:sweep:1:sweep", "X", "y")

    assert [handler.filter(r) for r in (cron_start, cron_done, health)] == [False] * 3
    assert handler.filter(job_done) and handler.filter(cron_failed)
    # At DEBUG, everything.
    debug_handler, _ = _configured("DEBUG", "json")
    assert debug_handler.filter(cron_start) and debug_handler.filter(health)


def test_text_logs_are_one_readable_line_with_the_context_and_extras() -> None:
    _, formatter = _configured("INFO", "text")
    record = logging.LogRecord("app.worker", logging.WARNING, __file__, 1, "deferred", (), None)
    record.provider = "twilio"

    with message_context("5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"):
        line = formatter.format(record)

    assert not line.startswith("{")
    assert line.endswith(
        "WARNING app.worker: deferred  message_id=5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"
        "  provider=twilio"
    )


async def test_metrics_report_the_oldest_sending_claim(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await queued_message(session_factory, world)
    await api.get("/metrics", headers=METRICS_AUTH)
    assert sample("smsgate_oldest_sending_message_age_seconds") == 0.0  # none sending

    async with session_factory.begin() as session:
        await session.execute(
            update(Message).values(
                status="sending", attempts=1, claimed_at=datetime.now(UTC) - timedelta(minutes=5)
            )
        )
    await api.get("/metrics", headers=METRICS_AUTH)

    assert 300 <= sample("smsgate_oldest_sending_message_age_seconds") < 360


async def test_metrics_report_each_providers_breaker_and_pause(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    health = ProviderHealth(redis, CircuitPolicy(failure_threshold=2))
    fault = ProviderError(ErrorKind.RETRYABLE, "HTTP 500", provider_fault=True)
    for _ in range(2):
        await health.record("twilio", fault)
    await health.pause("vonage", 30)

    await api.get("/metrics", headers=METRICS_AUTH)

    assert sample("smsgate_circuit_open", provider="twilio") == 1.0
    assert sample("smsgate_circuit_open", provider="vonage") == 0.0
    assert sample("smsgate_circuit_open", provider="fake") == 0.0
    assert 25 < sample("smsgate_provider_paused_seconds", provider="vonage") <= 30
    assert sample("smsgate_provider_paused_seconds", provider="twilio") == 0.0
    # Read, not probed: the open breaker's state is unchanged by the scrape.
    assert (await health.check("twilio", may_probe=False)).state is CircuitState.OPEN
