"""/v1/api-keys: list, create, revoke and rotate API keys (admin key)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import api_keys as domain
from app.access.lookups import Lookups
from app.access.schemas import ApiKeyCreated, ApiKeyIn, ApiKeyList, ApiKeyOut, RotateKeyIn
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
from app.web.deps import AdminDep, LookupsDep, SessionDep

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])

KeyIdPath = Annotated[
    uuid.UUID,
    Path(description="The key's id.", examples=["9d4c2a1e-6f0b-4e8a-b3c5-7d1e2f3a4b5c"]),
]


def _forget_keys_after_commit(session: AsyncSession, lookups: Lookups) -> None:
    """This process stops honouring the old key as soon as the change is committed."""
    session.info.setdefault(AFTER_COMMIT, []).append(lookups.forget_principals)


@router.get("", response_model=ApiKeyList, responses=problem_responses(Unauthorized, Forbidden))
async def list_api_keys(
    session: SessionDep,
    _admin: AdminDep,
    client: Annotated[
        StorableStr | None,
        Query(max_length=200, description="Only this client's keys.", examples=["billing"]),
    ] = None,
) -> ApiKeyList:
    """Every key (name, prefix, created, last used, expiry), revoked and expired ones too."""
    return ApiKeyList(data=[ApiKeyOut.of(view) for view in await domain.list_keys(session, client)])


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=problem_responses(Unauthorized, Forbidden, ValidationFailed),
)
async def create_api_key(request: ApiKeyIn, session: SessionDep, _admin: AdminDep) -> ApiKeyCreated:
    """Make a key for a client (created if new); its secret is in this response only."""
    raw_key, view = await domain.create(
        session,
        request.client,
        name=request.name,
        is_admin=request.admin,
        expires_at=request.expires_at,
    )
    return ApiKeyCreated(key=raw_key, api_key=ApiKeyOut.of(view))


@router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def revoke_api_key(
    key_id: KeyIdPath, session: SessionDep, _admin: AdminDep, lookups: LookupsDep
) -> ApiKeyOut:
    """Revoke a key: refused at once by this process, within LOOKUP_CACHE_SECONDS by others."""
    _forget_keys_after_commit(session, lookups)
    return ApiKeyOut.of(await domain.revoke(session, str(key_id)))


@router.post(
    "/{key_id}/rotate",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, Conflict, ValidationFailed),
)
async def rotate_api_key(
    key_id: KeyIdPath,
    session: SessionDep,
    _admin: AdminDep,
    lookups: LookupsDep,
    rotation: Annotated[
        RotateKeyIn | None,
        Body(
            description="Optional: the overlap, and the new key's expiry.",
            examples=[{"overlap_seconds": 86400}],
        ),
    ] = None,
) -> ApiKeyCreated:
    """A new key in place of this one; the old one keeps working for the overlap."""
    rotation = rotation or RotateKeyIn()
    _forget_keys_after_commit(session, lookups)
    raw_key, new, old = await domain.rotate(
        session,
        str(key_id),
        overlap=timedelta(seconds=rotation.overlap_seconds),
        expires_at=rotation.expires_at,
    )
    return ApiKeyCreated(key=raw_key, api_key=ApiKeyOut.of(new), previous=ApiKeyOut.of(old))
