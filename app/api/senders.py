"""/v1/senders: the addresses the service sends from (admin key required)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminDep, LookupsDep, SessionDep, SettingsDep
from app.api.params import SenderIdPath
from app.api.schemas import SenderIn, SenderList, SenderOut, SenderPatch
from app.domain import senders as domain
from app.domain.messages import AFTER_COMMIT
from app.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    ValidationFailed,
    problem_responses,
)

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
    )
    return SenderOut.of(sender, accept_default_replies=settings.accept_default_keyword_replies)


@router.get("", response_model=SenderList, responses=problem_responses(Unauthorized, Forbidden))
async def list_senders(session: SessionDep, _admin: AdminDep, settings: SettingsDep) -> SenderList:
    """Every sender."""
    accept = settings.accept_default_keyword_replies
    return SenderList(
        data=[
            SenderOut.of(sender, accept_default_replies=accept)
            for sender in await domain.list_senders(session)
        ]
    )


@router.get(
    "/{sender_id}",
    response_model=SenderOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def get_sender(
    sender_id: SenderIdPath, session: SessionDep, _admin: AdminDep, settings: SettingsDep
) -> SenderOut:
    """One sender, with the replies it still lacks."""
    return SenderOut.of(
        await domain.get_sender(session, sender_id),
        accept_default_replies=settings.accept_default_keyword_replies,
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
    """Change a sender's provider, fallback provider, rate, description or keywords."""
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
    )
    return SenderOut.of(sender, accept_default_replies=settings.accept_default_keyword_replies)
