"""/v1/senders: the addresses the service sends from. Admin keys manage them and grant them to
clients; a client key reads the senders granted to its client, and no other."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.db.session import AFTER_COMMIT
from app.kernel.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    ValidationFailed,
    problem_responses,
)
from app.kernel.text import StorableStr
from app.senders import service as domain
from app.senders.schemas import SenderClients, SenderIn, SenderList, SenderOut, SenderPatch
from app.web.deps import AdminDep, LookupsDep, PrincipalDep, SessionDep, SettingsDep
from app.web.params import SenderIdPath

router = APIRouter(prefix="/v1/senders", tags=["senders"])


@router.post(
    "",
    status_code=201,
    response_model=SenderOut,
    responses=problem_responses(Unauthorized, Forbidden, Conflict, ValidationFailed),
)
async def create_sender(
    request: SenderIn, session: SessionDep, _admin: AdminDep, settings: SettingsDep
) -> SenderOut:
    """Add a sender bound to a provider."""
    sender = await domain.create_sender(
        session,
        address=request.address,
        kind=request.kind,
        provider=request.provider,
        description=request.description,
        default_region=settings.default_region,
        keywords=request.keywords,
        rate_per_second=request.rate_per_second,
        fallback_provider=request.fallback_provider,
        countries=request.countries,
    )
    return SenderOut.of(sender, accept_default_replies=settings.accept_default_keyword_replies)


@router.get("", response_model=SenderList, responses=problem_responses(Unauthorized))
async def list_senders(
    session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> SenderList:
    """Every sender (admin key), or the senders granted to your client."""
    accept = settings.accept_default_keyword_replies
    client_id = None if principal.is_admin else principal.client_id
    return SenderList(
        data=[
            SenderOut.of(sender, accept_default_replies=accept)
            for sender in await domain.list_senders(session, client_id)
        ]
    )


@router.get(
    "/{sender_id}",
    response_model=SenderOut,
    responses=problem_responses(Unauthorized, NotFound),
)
async def get_sender(
    sender_id: SenderIdPath, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> SenderOut:
    """One sender (of your client's, unless admin), with the replies it still lacks."""
    client_id = None if principal.is_admin else principal.client_id
    return SenderOut.of(
        await domain.get_owned_sender(session, sender_id, client_id),
        accept_default_replies=settings.accept_default_keyword_replies,
    )


ClientNamePath = Annotated[
    StorableStr,
    Path(min_length=1, max_length=200, description="The client's name.", examples=["billing"]),
]


@router.get(
    "/{sender_id}/clients",
    response_model=SenderClients,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def list_sender_clients(
    sender_id: SenderIdPath, session: SessionDep, _admin: AdminDep
) -> SenderClients:
    """The clients that may send from this sender (admin key)."""
    return SenderClients(
        sender_id=sender_id, clients=await domain.sender_client_names(session, sender_id)
    )


@router.put(
    "/{sender_id}/clients/{client_name}",
    response_model=SenderClients,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def grant_sender(
    sender_id: SenderIdPath,
    client_name: ClientNamePath,
    session: SessionDep,
    _admin: AdminDep,
    lookups: LookupsDep,
) -> SenderClients:
    """Let a client send from this sender, name it in opt-outs and read its inbound messages
    (admin key). Granting twice changes nothing."""
    session.info.setdefault(AFTER_COMMIT, []).append(lambda: lookups.forget_sender(sender_id))
    await domain.grant_sender(session, sender_id, client_name)
    return SenderClients(
        sender_id=sender_id, clients=await domain.sender_client_names(session, sender_id)
    )


@router.delete(
    "/{sender_id}/clients/{client_name}",
    response_model=SenderClients,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def revoke_sender(
    sender_id: SenderIdPath,
    client_name: ClientNamePath,
    session: SessionDep,
    _admin: AdminDep,
    lookups: LookupsDep,
) -> SenderClients:
    """Take the sender away from a client (admin key); it stops being the client's default.
    Messages already accepted are still delivered."""

    def forget() -> None:
        lookups.forget_sender(sender_id)
        lookups.forget_principals()  # the client's default sender may have gone

    session.info.setdefault(AFTER_COMMIT, []).append(forget)
    await domain.revoke_sender(session, sender_id, client_name)
    return SenderClients(
        sender_id=sender_id, clients=await domain.sender_client_names(session, sender_id)
    )


@router.patch(
    "/{sender_id}",
    response_model=SenderOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def update_sender(
    sender_id: SenderIdPath,
    request: SenderPatch,
    session: SessionDep,
    _admin: AdminDep,
    settings: SettingsDep,
    lookups: LookupsDep,
) -> SenderOut:
    """Change a sender's provider, fallback provider, rate, description, keywords or the
    countries it serves from a pool."""
    # This process sends with the change as soon as it is committed; others within the cache's TTL.
    session.info.setdefault(AFTER_COMMIT, []).append(lambda: lookups.forget_sender(sender_id))
    sender = await domain.update_sender(
        session,
        sender_id,
        provider=request.provider,
        description=request.description,
        keywords=request.keywords,
        rate_per_second=request.rate_per_second,
        fallback_provider=(
            request.fallback_provider
            if "fallback_provider" in request.model_fields_set
            else domain.UNCHANGED
        ),
        countries=request.countries
        if "countries" in request.model_fields_set
        else domain.UNCHANGED,
    )
    return SenderOut.of(sender, accept_default_replies=settings.accept_default_keyword_replies)
