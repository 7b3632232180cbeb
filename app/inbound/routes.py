"""/v1/inbound: messages customers sent to our senders. Admin keys read all of them; a client key
reads those sent to its client's senders (they are customers' words: nobody else's)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.inbound.schemas import InboundOut, InboundPage
from app.inbound.service import InboundFilter, list_inbound
from app.kernel.errors import Unauthorized, ValidationFailed, problem_responses
from app.kernel.pagination import as_utc, decode_cursor, encode_cursor
from app.kernel.phone import E164
from app.senders.keywords import KeywordCategory
from app.web.deps import PrincipalDep, SessionDep
from app.web.params import (
    CreatedAfterQuery,
    CreatedBeforeQuery,
    CursorQuery,
    LimitQuery,
    SenderIdQuery,
)

router = APIRouter(prefix="/v1/inbound", tags=["inbound"])


@router.get(
    "",
    response_model=InboundPage,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def list_inbound_messages(
    session: SessionDep,
    principal: PrincipalDep,
    from_: Annotated[
        E164 | None,
        Query(alias="from", description="Only from this number.", examples=["+14155550123"]),
    ] = None,
    sender_id: SenderIdQuery = None,
    keyword_category: Annotated[
        KeywordCategory | None,
        Query(description="Only messages that matched this category.", examples=["opt_out"]),
    ] = None,
    created_after: CreatedAfterQuery = None,
    created_before: CreatedBeforeQuery = None,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> InboundPage:
    """Inbound messages (a client key: to its client's senders), newest first, with the keyword
    each matched and our reply."""
    rows = await list_inbound(
        session,
        InboundFilter(
            from_=from_,
            sender_id=sender_id,
            keyword_category=keyword_category,
            created_after=as_utc(created_after, "created_after") if created_after else None,
            created_before=as_utc(created_before, "created_before") if created_before else None,
            client_id=None if principal.is_admin else principal.client_id,
        ),
        after=decode_cursor(cursor, uuid.UUID) if cursor else None,
        limit=limit + 1,
    )
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return InboundPage(
        data=[InboundOut.model_validate(row) for row in page],
        has_more=next_cursor is not None,
        next_cursor=next_cursor,
    )
