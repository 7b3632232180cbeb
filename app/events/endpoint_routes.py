"""Where your events go and how they are signed: /v1/event-endpoints, /v1/signing-secrets, and
each sender's endpoint and secrets (admin keys)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Response

from app.events import endpoints as domain
from app.events import signing
from app.events.endpoints import Owner
from app.events.schemas import EndpointIn, EndpointList, EndpointOut, RotateIn, SecretList
from app.kernel.errors import Forbidden, NotFound, Unauthorized, ValidationFailed, problem_responses
from app.kernel.pagination import decode_cursor, encode_cursor
from app.kernel.settings import Settings
from app.senders.service import get_sender
from app.web.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep
from app.web.params import CursorQuery, LimitQuery, SenderIdPath

router = APIRouter(tags=["events"])

EndpointIdPath = Annotated[
    uuid.UUID,
    Path(description="The endpoint's id.", examples=["3f2b8c1d-5e6a-4b7c-8d9e-0a1b2c3d4e5f"]),
]
RotateBody = Annotated[
    RotateIn | None,
    Body(
        description="Optional: how long the current secrets keep signing.",
        examples=[{"grace_period_seconds": 86400}],
    ),
]
_NO_CONTENT: dict[int | str, dict[str, Any]] = {
    204: {"description": "Done: no default endpoint any more."}
}


def _grace(rotation: RotateIn | None, settings: Settings) -> timedelta:
    seconds = rotation.grace_period_seconds if rotation else None
    return timedelta(seconds=settings.events.secret_grace_seconds if seconds is None else seconds)


@router.get(
    "/v1/event-endpoints",
    response_model=EndpointList,
    responses=problem_responses(Unauthorized),
)
async def list_endpoints(
    session: SessionDep,
    principal: PrincipalDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> EndpointList:
    """Your endpoints, oldest first: the default one and each `callback_url` in use (admin keys:
    senders' too)."""
    endpoints = await domain.list_endpoints(
        session,
        principal,
        after=decode_cursor(cursor, uuid.UUID) if cursor else None,
        limit=limit + 1,
    )
    page = endpoints[:limit]
    next_cursor = (
        encode_cursor(page[-1].created_at, page[-1].id) if len(endpoints) > limit else None
    )
    return EndpointList(
        data=[EndpointOut.of(endpoint) for endpoint in page],
        has_more=next_cursor is not None,
        next_cursor=next_cursor,
    )


@router.put(
    "/v1/event-endpoints/default",
    response_model=EndpointOut,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def set_default_endpoint(
    request: EndpointIn, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> EndpointOut:
    """Send your messages' status changes here (unless a message has its own `callback_url`)."""
    endpoint = await domain.configure_default(
        session, Owner(client_id=principal.client_id), str(request.url), settings.events
    )
    return EndpointOut.of(endpoint)


@router.delete(
    "/v1/event-endpoints/default",
    status_code=204,
    responses={**problem_responses(Unauthorized), **_NO_CONTENT},
)
async def clear_default_endpoint(session: SessionDep, principal: PrincipalDep) -> Response:
    """Stop sending status changes to your default endpoint (events already written still go)."""
    await domain.clear_default(session, Owner(client_id=principal.client_id))
    return Response(status_code=204)


@router.post(
    "/v1/event-endpoints/{endpoint_id}/enable",
    response_model=EndpointOut,
    responses=problem_responses(Unauthorized, NotFound),
)
async def enable_endpoint(
    endpoint_id: EndpointIdPath, session: SessionDep, principal: PrincipalDep
) -> EndpointOut:
    """Send to an endpoint again after its receiver answered 410 Gone."""
    return EndpointOut.of(await domain.enable(session, principal, endpoint_id))


@router.get(
    "/v1/signing-secrets", response_model=SecretList, responses=problem_responses(Unauthorized)
)
async def list_signing_secrets(session: SessionDep, principal: PrincipalDep) -> SecretList:
    """The secrets that sign your events now (the first is made on first use)."""
    owner = Owner(client_id=principal.client_id)
    return SecretList.of(await signing.active_secrets(session, owner))


@router.post(
    "/v1/signing-secrets/rotate",
    response_model=SecretList,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def rotate_signing_secret(
    session: SessionDep, principal: PrincipalDep, settings: SettingsDep, rotation: RotateBody = None
) -> SecretList:
    """Make a new secret; the current ones keep signing for the grace period."""
    owner = Owner(client_id=principal.client_id)
    return SecretList.of(await signing.rotate(session, owner, _grace(rotation, settings)))


@router.put(
    "/v1/senders/{sender_id}/event-endpoint",
    response_model=EndpointOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def set_sender_endpoint(
    sender_id: SenderIdPath,
    request: EndpointIn,
    session: SessionDep,
    _admin: AdminDep,
    settings: SettingsDep,
) -> EndpointOut:
    """Send this sender's inbound messages (not keywords) and opt-out changes here."""
    endpoint = await domain.configure_default(
        session, Owner(sender_id=sender_id), str(request.url), settings.events
    )
    return EndpointOut.of(endpoint)


@router.delete(
    "/v1/senders/{sender_id}/event-endpoint",
    status_code=204,
    responses={**problem_responses(Unauthorized, Forbidden, NotFound), **_NO_CONTENT},
)
async def clear_sender_endpoint(
    sender_id: SenderIdPath, session: SessionDep, _admin: AdminDep
) -> Response:
    """Stop sending this sender's events."""
    await get_sender(session, sender_id)
    await domain.clear_default(session, Owner(sender_id=sender_id))
    return Response(status_code=204)


@router.get(
    "/v1/senders/{sender_id}/signing-secrets",
    response_model=SecretList,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def list_sender_signing_secrets(
    sender_id: SenderIdPath, session: SessionDep, _admin: AdminDep
) -> SecretList:
    """The secrets that sign this sender's events now."""
    await get_sender(session, sender_id)
    return SecretList.of(await signing.active_secrets(session, Owner(sender_id=sender_id)))


@router.post(
    "/v1/senders/{sender_id}/signing-secrets/rotate",
    response_model=SecretList,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def rotate_sender_signing_secret(
    sender_id: SenderIdPath,
    session: SessionDep,
    _admin: AdminDep,
    settings: SettingsDep,
    rotation: RotateBody = None,
) -> SecretList:
    """Make a new secret for this sender; the current ones keep signing for the grace period."""
    await get_sender(session, sender_id)
    owner = Owner(sender_id=sender_id)
    return SecretList.of(await signing.rotate(session, owner, _grace(rotation, settings)))
