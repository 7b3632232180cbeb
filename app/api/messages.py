"""/v1/messages: send, preview, read and list messages."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.api.params import (
    CreatedAfterQuery,
    CreatedBeforeQuery,
    CursorQuery,
    LimitQuery,
    MessageIdPath,
)
from app.api.schemas import (
    E164,
    MessageDetail,
    MessageOut,
    MessagePage,
    PreviewOut,
    PreviewRequest,
    SendMessageRequest,
    StatusChange,
)
from app.domain import messages as domain
from app.domain.destinations import check_destination
from app.domain.encoding import analyze_body
from app.domain.idempotency import fingerprint, run_idempotently
from app.domain.status import MessageStatus
from app.errors import (
    Conflict,
    NotFound,
    PolicyRefusal,
    Unauthorized,
    ValidationFailed,
    problem_responses,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/messages", tags=["messages"])

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        examples=["order-1042-shipped"],
        description="Any unique string (a UUID is good). Retrying with the same key and body "
        "returns the first response and sends nothing new; kept for at least 24 hours.",
    ),
]


@router.post(
    "",
    status_code=202,
    response_model=MessageOut,
    responses={
        **problem_responses(Unauthorized, PolicyRefusal, Conflict, ValidationFailed),
        202: {
            "description": "Accepted and queued for delivery. A replay of an earlier request "
            "with the same Idempotency-Key carries the header `Idempotent-Replayed: true`."
        },
    },
)
async def send_message(
    request: SendMessageRequest,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Accept a message for delivery."""
    command = domain.SendCommand(
        to=request.to,
        body=request.body,
        sender=request.from_,
        callback_url=str(request.callback_url) if request.callback_url else None,
        validity_period=request.validity_period,
        metadata=request.metadata,
    )

    async def accept() -> tuple[int, dict[str, Any]]:
        if command.callback_url is not None:  # https, and not into our own network (422)
            await check_destination(command.callback_url, settings.events, field="callback_url")
        message = await domain.accept_message(
            session,
            principal,
            command,
            max_segments=settings.max_segments,
            default_region=settings.default_region,
            accept_default_replies=settings.accept_default_keyword_replies,
        )
        if settings.log_message_bodies:
            log.info("message body", extra={"message_id": str(message.id), "body": message.body})
        return 202, MessageOut.model_validate(message).model_dump(mode="json", by_alias=True)

    if idempotency_key is None:
        status, body = await accept()
        return JSONResponse(body, status_code=status)
    stored = await run_idempotently(
        session,
        client_id=principal.client_id,
        key=idempotency_key,
        request_fingerprint=fingerprint(request.model_dump(mode="json", by_alias=True)),
        ttl=timedelta(hours=settings.idempotency_ttl_hours),
        produce=accept,
    )
    headers = {"Idempotent-Replayed": "true"} if stored.replayed else {}
    return JSONResponse(stored.body, status_code=stored.status, headers=headers)


@router.post(
    "/preview",
    response_model=PreviewOut,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def preview_message(
    request: PreviewRequest, principal: PrincipalDep, settings: SettingsDep
) -> PreviewOut:
    """Analyse a body (encoding, segments, characters forcing UCS-2) without sending it."""
    analysis = analyze_body(request.body)
    return PreviewOut(
        encoding=analysis.encoding.value,
        segments=analysis.segments,
        units=analysis.units,
        non_gsm_characters=list(analysis.non_gsm_characters),
        max_segments=settings.max_segments,
        within_limit=analysis.segments <= settings.max_segments,
    )


@router.get(
    "/{message_id}",
    response_model=MessageDetail,
    responses=problem_responses(Unauthorized, NotFound),
)
async def get_message(
    message_id: MessageIdPath, session: SessionDep, principal: PrincipalDep
) -> MessageDetail:
    """A message with its status history."""
    message, history = await domain.get_message(session, principal, message_id)
    return MessageDetail(
        **MessageOut.model_validate(message).model_dump(),
        history=[StatusChange.model_validate(event) for event in history],
    )


@router.get(
    "",
    response_model=MessagePage,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def list_messages(
    session: SessionDep,
    principal: PrincipalDep,
    to: Annotated[
        E164 | None, Query(description="Only messages to this number.", examples=["+14155550123"])
    ] = None,
    status: Annotated[
        MessageStatus | None,
        Query(description="Only messages in this status.", examples=["delivered"]),
    ] = None,
    created_after: CreatedAfterQuery = None,
    created_before: CreatedBeforeQuery = None,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> MessagePage:
    """Your messages, newest first, one page at a time."""
    page = await domain.list_messages(
        session,
        principal.client_id,
        domain.MessageFilter(
            to=to, status=status, created_after=created_after, created_before=created_before
        ),
        limit=limit,
        cursor=cursor,
    )
    return MessagePage(
        data=[MessageOut.model_validate(message) for message in page.items],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )
