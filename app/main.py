"""The API application: `create_app()` wires settings, database, queue and providers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access import routes as keys
from app.access.lookups import Lookups
from app.callbacks import routes as webhooks
from app.consent import routes as optouts
from app.console import routes as console
from app.db.migrations import head_revision
from app.db.pg import Database
from app.db.session import create_engine, create_session_factory, ping
from app.events import endpoint_routes as event_endpoints
from app.events import routes as events
from app.health import routes as health
from app.inbound import routes as inbound
from app.kernel.errors import (
    PROBLEM_JSON,
    Problem,
    ServiceError,
    ValidationFailed,
    document_edge_responses,
    problem_json_only,
)
from app.kernel.logs import RequestIdMiddleware, describe_error
from app.kernel.outages import Outage
from app.kernel.secrets import Keyring, install
from app.kernel.settings import Settings, get_settings
from app.providers.registry import build_http_client, build_providers
from app.senders import routes as senders
from app.sending import routes as messages
from app.sending.accept import Acceptor
from app.traffic import pumping_routes as pumping
from app.traffic import quiet_hours_routes as quiet_hours
from app.traffic import routes as traffic
from app.traffic.alarm import pumping_check
from app.traffic.control import TrafficControl
from app.twilio_api import routes as twilio_compat
from app.web.docs import install_docs
from app.web.limits import BodySizeLimit, UnhandledErrors
from app.worker.queue import DeliveryBatcher, close_queue, create_queue

log = logging.getLogger(__name__)

DESCRIPTION = """
Send transactional SMS through Twilio, Vonage or the built-in fake provider, and follow each
message to `delivered`.

* Authenticate with `Authorization: Bearer <api key>` (create one with `smsgate create-api-key`).
* Send with `POST /v1/messages` (up to 1,000 at once with `POST /v1/messages/batch`); add an
  `Idempotency-Key` header so retries never send twice.
* Errors are `application/problem+json` with a stable `code` and, for invalid input, the field.
"""


_ROUTERS = (
    messages.router,
    senders.router,
    optouts.router,
    inbound.router,
    webhooks.router,
    health.router,
    events.router,
    event_endpoints.router,
    keys.router,
    traffic.router,
    pumping.router,
    pumping.clients_router,
    quiet_hours.router,
    twilio_compat.admin_router,
    twilio_compat.router,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; everything it connects to comes from `settings`."""
    settings = settings or get_settings()

    def lifespan(app: FastAPI) -> AbstractAsyncContextManager[None]:
        return _connected(app, settings)

    app = FastAPI(
        title="smsgate",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, without a CDN
        redoc_url=None,
    )
    install_docs(app)
    for router in _ROUTERS:
        app.include_router(router)
    app.webhooks.include_router(events.webhooks)  # what receivers get, documented
    console.install(app)  # the operator console's pages, outside the OpenAPI document
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # A 500 of our own, so the server never sees an exception (it would drop the connection).
    app.add_middleware(UnhandledErrors, verbose=settings.log_message_bodies)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a refused body gets an id

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_edge_responses(
                twilio_compat.twilio_answers(problem_json_only(FastAPI.openapi(app)))
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _connected(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """The API's lifespan: open what it connects to (on `app.state`), close it all at the end."""
    # Signing secrets are stored encrypted: without the key the API does not start.
    install(Keyring.from_settings(settings))
    engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
    db = Database(settings.database_url, size=settings.db_pool_size)
    http = build_http_client(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = create_session_factory(engine)
    app.state.queue = create_queue(settings.redis_url)
    app.state.delivery_batcher = DeliveryBatcher(app.state.queue)
    app.state.lookups = Lookups(
        db,
        ttl=settings.lookup_cache_seconds,
        accept_default_replies=settings.accept_default_keyword_replies,
    )
    app.state.traffic = TrafficControl(
        db, app.state.queue, settings.traffic, ttl=settings.lookup_cache_seconds
    )
    app.state.acceptor = Acceptor(
        db,
        app.state.lookups,
        settings,
        app.state.delivery_batcher.enqueue,
        app.state.traffic,
        velocity=pumping_check(app.state.queue, app.state.session_factory, settings),
    )
    app.state.http = http
    app.state.providers = build_providers(settings, http)
    app.state.schema_head = head_revision()
    app.state.db_outage = Outage("postgresql", probe=lambda: ping(engine))
    try:
        yield
    finally:
        await app.state.db_outage.close()
        await app.state.delivery_batcher.close()
        if app.state.acceptor.velocity is not None:
            await app.state.acceptor.velocity.close()
        await close_queue(app.state.queue)
        await http.aclose()
        await db.close()
        await engine.dispose()


def _problem(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
    return _problem(error.to_problem(), error.headers)


async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    return _problem(ValidationFailed.from_pydantic(error.errors()).to_problem())


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, unreadable body) as problems too."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return _problem(
        Problem(
            title=HTTPStatus(error.status_code).phrase,
            status=error.status_code,
            code=codes.get(error.status_code, "bad_request"),
            detail=str(error.detail),
        ),
        headers=dict(error.headers or {}),
    )


async def _unstorable(_: Request, error: Exception) -> JSONResponse:
    """Validation should have caught it; if not, the input (not the service) is at fault."""
    log.warning("input the database refused", extra=describe_error(error))
    return _problem(
        Problem(
            title="Invalid request",
            status=422,
            code="invalid_input",
            detail="a value cannot be stored (out of range or an invalid character)",
        )
    )


async def _database_unavailable(request: Request, error: Exception) -> JSONResponse:
    """Expected back-pressure while PostgreSQL is away: one warning per outage, with counts
    (app.kernel.outages), not an error per request."""
    outage: Outage | None = getattr(request.app.state, "db_outage", None)
    if outage is None:
        log.warning("dependency unavailable", extra=describe_error(error))
    else:
        outage.failed(error)
    return _problem(
        Problem(
            title="Service unavailable",
            status=503,
            code="service_unavailable",
            detail="the database is unreachable; nothing was stored, retry later",
        ),
        headers={"Retry-After": "5"},
    )


# SQLSTATE classes that say the database is unavailable, not the request wrong: 57 (starting,
# shutting down, restarted), 08 (connection lost), 53 (out of resources: too many
# connections, no memory or disk).
_UNAVAILABLE_SQLSTATES = ("57", "08", "53")


async def _database_error(request: Request, error: DBAPIError) -> JSONResponse:
    """PostgreSQL unavailable (above), or the connection lost mid-request: a 503. Anything
    else stays a 500."""
    sqlstate = str(getattr(error.orig, "sqlstate", None) or "")
    if error.connection_invalidated or sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return await _database_unavailable(request, error)
    driver_error = getattr(error, "driver_exception", None)
    if sqlstate.startswith("22") or isinstance(driver_error, asyncpg.exceptions.DataError):
        return await _unstorable(request, error)  # class 22: data exception
    raise error


async def _asyncpg_error(request: Request, error: asyncpg.PostgresError) -> JSONResponse:
    """The send path's pool (app.db.pg) speaks asyncpg directly: the same answers as above."""
    sqlstate = str(getattr(error, "sqlstate", None) or "")
    if sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return await _database_unavailable(request, error)
    if sqlstate.startswith("22"):
        return await _unstorable(request, error)
    raise error


# Exception class -> its handler, registered in this order.
_ERROR_HANDLERS: tuple[
    tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]], ...
] = (
    (ServiceError, _service_error),
    (RequestValidationError, _invalid_request),
    (StarletteHTTPException, _http_error),
    # asyncpg's own refusal of a value it cannot encode (a lone surrogate, say): not the
    # database unavailable, as the InterfaceError it also is would say.
    (asyncpg.exceptions.DataError, _unstorable),
    (DataError, _unstorable),
    (OSError, _database_unavailable),
    # asyncpg's answer when a statement meets a connection the server has just closed.
    (asyncpg.exceptions.InternalClientError, _database_unavailable),
    (asyncpg.InterfaceError, _database_unavailable),
    (InterfaceError, _database_unavailable),
    (OperationalError, _database_unavailable),
    (DBAPIError, _database_error),
    (asyncpg.PostgresError, _asyncpg_error),
)


def _install_error_handlers(app: FastAPI) -> None:
    for exception, handler in _ERROR_HANDLERS:
        app.add_exception_handler(exception, handler)
