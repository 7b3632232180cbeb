"""Request dependencies: the session (one transaction per request), the caller, settings."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal
from app.access.lookups import Lookups
from app.db.session import AFTER_COMMIT, ENQUEUE_AFTER_COMMIT, SessionFactory
from app.delivery.transitions import record_status_report
from app.events.outbox import scheduled
from app.kernel.errors import Forbidden
from app.kernel.settings import Settings
from app.providers.base import Provider, StatusReport
from app.sending.accept import Acceptor
from app.traffic.control import TrafficControl
from app.worker.queue import enqueue_events


async def get_session(request: Request) -> AsyncGenerator[AsyncSession]:
    """A session whose transaction commits when the endpoint returns, before the response is sent.

    Messages the request accepted (and events it wrote) are enqueued only after that commit, so a
    job never points at a row that was rolled back.
    """
    async with request.app.state.session_factory() as session, session.begin():
        yield session
    for callback in session.info.pop(AFTER_COMMIT, []):
        callback()
    to_enqueue = session.info.pop(ENQUEUE_AFTER_COMMIT, [])
    if to_enqueue:
        await request.app.state.delivery_batcher.enqueue(to_enqueue)
    events = scheduled(session)
    if events:
        await enqueue_events(request.app.state.queue, events)


# scope="function": commit before the response goes out, so a 2xx means the data is stored.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_session_factory(request: Request) -> SessionFactory:
    """The session factory, for the few endpoints that commit in several transactions (a bulk
    import, chunk by chunk) instead of the request's one."""
    factory: SessionFactory = request.app.state.session_factory
    return factory


SessionFactoryDep = Annotated[SessionFactory, Depends(get_session_factory)]


async def get_settings_dep(request: Request) -> Settings:
    """The settings the app was built with (async: FastAPI runs a plain function in a thread)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


class _BearerHeader(HTTPBearer):
    """The bearer scheme as OpenAPI documents it; hands on the raw `Authorization` header
    (`Lookups.principal` checks its form), without building a credentials model per request."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        """The request's `Authorization` header, if any."""
        return request.headers.get("authorization")


_bearer = _BearerHeader(
    auto_error=False, scheme_name="HTTPBearer", description="Your API key, as `Bearer <key>`."
)


async def get_lookups(request: Request) -> Lookups:
    """The process's cached lookups of API keys and senders."""
    lookups: Lookups = request.app.state.lookups
    return lookups


LookupsDep = Annotated[Lookups, Depends(get_lookups)]


async def get_principal(
    request: Request, authorization: Annotated[str | None, Depends(_bearer)]
) -> Principal:
    """The client behind the request's API key (cached; no session: the send path has none).
    The lookups are read off the app here, not through a dependency of their own: every
    dependency costs each request of the send path."""
    lookups: Lookups = request.app.state.lookups
    return await lookups.principal(authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(principal: PrincipalDep) -> Principal:
    """The caller, who must hold an admin key."""
    if not principal.is_admin:
        raise Forbidden("admin_key_required", "this endpoint needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


async def get_providers(request: Request) -> dict[str, Provider]:
    """Provider adapters, for verifying and parsing callbacks."""
    providers: dict[str, Provider] = request.app.state.providers
    return providers


ProvidersDep = Annotated[dict[str, Provider], Depends(get_providers)]


class StatusRecorder:
    """Records a provider's status report in a transaction of its own (run again after a
    deadlock: a callback answered 500 is lost), then enqueues the events it wrote."""

    def __init__(self, request: Request) -> None:
        self._state = request.app.state

    async def __call__(self, provider: str, report: StatusReport) -> bool:
        """Whether a message matched the report."""
        matched, events = await record_status_report(self._state.session_factory, provider, report)
        if events:
            await enqueue_events(self._state.queue, events)
        return matched


async def get_status_recorder(request: Request) -> StatusRecorder:
    """The status-report recorder, for callback endpoints (no request-wide transaction)."""
    return StatusRecorder(request)


StatusRecorderDep = Annotated[StatusRecorder, Depends(get_status_recorder)]


async def get_acceptor(request: Request) -> Acceptor:
    """What the send endpoints accept messages with."""
    acceptor: Acceptor = request.app.state.acceptor
    return acceptor


AcceptorDep = Annotated[Acceptor, Depends(get_acceptor)]


async def get_traffic(request: Request) -> TrafficControl:
    """The process's traffic control (its cache of clients' rules)."""
    traffic: TrafficControl = request.app.state.traffic
    return traffic


TrafficDep = Annotated[TrafficControl, Depends(get_traffic)]
