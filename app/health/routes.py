"""Liveness, readiness and metrics for orchestrators and Prometheus."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.delivery.circuit import CircuitPolicy, CircuitState, Health, ProviderHealth
from app.health.readings import oldest_queued_age, oldest_sending_age
from app.kernel.errors import NotFound, Unauthorized, problem_responses
from app.kernel.metrics import (
    CIRCUIT_OPEN,
    OLDEST_QUEUED_AGE,
    OLDEST_SENDING_AGE,
    PROVIDER_PAUSED,
    QUEUE_DEPTH,
)
from app.worker.queue import queue_depth

router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_SECONDS = 2.0


@router.get(
    "/healthz",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> dict[str, str]:
    """The process is up and serving (no dependency is checked)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {
            "description": "Ready.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "ok",
                        "checks": {"postgresql": "ok", "redis": "ok", "migrations": "ok"},
                    }
                }
            },
        },
        503: {
            "description": "A dependency is unreachable, or the schema is not at the newest "
            "migration.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "checks": {
                            "postgresql": "ok",
                            "redis": "error: ConnectionError",
                            "migrations": "ok",
                        },
                    }
                }
            },
        },
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Ready to take traffic: PostgreSQL and Redis answer, and the schema is at the newest
    migration this code ships."""
    checks = {
        "postgresql": await _check(_ping_database(request)),
        "redis": await _check(request.app.state.queue.ping()),
        "migrations": await _check(_schema_at_head(request)),
    }
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **problem_responses(Unauthorized, NotFound),
        200: {
            "description": "Prometheus text exposition format.",
            "content": {CONTENT_TYPE_LATEST: {"example": "smsgate_queue_depth 0.0\n"}},
        },
    },
)
async def metrics(
    request: Request,
    authorization: Annotated[
        str | None,
        Header(
            description="`Bearer <METRICS_TOKEN>` (not an API key).",
            examples=["Bearer your-metrics-token"],
        ),
    ] = None,
) -> Response:
    """Prometheus metrics of this API process, with the service's state read now: the queue's
    depth, the oldest queued message and `sending` claim, each provider's breaker and pause.

    They name senders and their volumes, so they are served only to `METRICS_TOKEN`: without
    that setting, not at all (404)."""
    token = request.app.state.settings.metrics_token.get_secret_value()
    if not token:
        raise NotFound("not_found", "metrics are off on this port: set METRICS_TOKEN")
    offered = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(offered.encode("utf-8", "surrogatepass"), token.encode()):
        raise Unauthorized("invalid_metrics_token", "send Authorization: Bearer <METRICS_TOKEN>")
    QUEUE_DEPTH.set(await _or_nan(queue_depth(request.app.state.queue)))
    OLDEST_QUEUED_AGE.set(await _or_nan(_oldest_queued_age(request)))
    OLDEST_SENDING_AGE.set(await _or_nan(_oldest_sending_age(request)))
    health = ProviderHealth(request.app.state.queue, CircuitPolicy())
    for provider in request.app.state.providers:
        state = await _or_none(health.check(provider, may_probe=False))  # reads, never probes
        nan = float("nan")
        CIRCUIT_OPEN.labels(provider).set(
            nan if state is None else float(state.state is not CircuitState.CLOSED)
        )
        PROVIDER_PAUSED.labels(provider).set(nan if state is None else state.paused_for)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _ping_database(request: Request) -> None:
    async with request.app.state.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def _schema_at_head(request: Request) -> None:
    async with request.app.state.engine.connect() as connection:
        current = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    expected = request.app.state.schema_head
    if current != expected:
        raise RuntimeError(f"schema at {current}, code expects {expected}")


async def _oldest_queued_age(request: Request) -> float:
    async with request.app.state.session_factory() as session:
        return await oldest_queued_age(session)


async def _oldest_sending_age(request: Request) -> float:
    async with request.app.state.session_factory() as session:
        return await oldest_sending_age(session)


async def _or_none(probe: Awaitable[Health]) -> Health | None:
    try:
        return await asyncio.wait_for(probe, CHECK_TIMEOUT_SECONDS)
    except Exception:  # Redis unreachable: the gauges read NaN
        return None


async def _or_nan(probe: Awaitable[float]) -> float:
    try:
        return await asyncio.wait_for(probe, CHECK_TIMEOUT_SECONDS)
    except Exception:  # a metric that cannot be read is NaN, not a failed scrape
        return float("nan")


async def _check(probe: Awaitable[object]) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_SECONDS)
    except Exception as error:  # any failure means "not ready"
        detail = str(error)[:200]
        return f"error: {type(error).__name__}" + (f": {detail}" if detail else "")
    return "ok"
