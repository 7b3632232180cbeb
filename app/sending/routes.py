"""/v1/messages: send (one or a batch), preview, read and list messages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import ValidationError as PydanticValidationError

from app.kernel.errors import (
    Conflict,
    NotFound,
    PolicyRefusal,
    ServiceError,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
    problem_responses,
)
from app.kernel.phone import E164, PHONE_CACHE
from app.kernel.status import MessageStatus
from app.sending import messages as domain
from app.sending.accept import Acceptor, Idempotency, Result, SendCommand, accept_messages
from app.sending.encoding import analyze_body
from app.sending.idempotency import StoredResponse, check_key, fingerprint
from app.sending.schemas import (
    BatchResult,
    HistoryNote,
    MessageDetail,
    MessageOut,
    MessagePage,
    PreviewOut,
    PreviewRequest,
    SendBatchRequest,
    SendMessageRequest,
    StatusChange,
)
from app.traffic.control import RATE_LIMIT_HEADERS, document_traffic
from app.traffic.pools import documented
from app.web.deps import AcceptorDep, PrincipalDep, SessionDep, SettingsDep
from app.web.params import (
    CreatedAfterQuery,
    CreatedBeforeQuery,
    CursorQuery,
    LimitQuery,
    MessageIdPath,
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
        **documented(
            document_traffic(
                problem_responses(
                    Unauthorized, PolicyRefusal, Conflict, ValidationFailed, TooManyRequests
                )
            )
        ),
        202: {
            "description": "Accepted and queued for delivery (or `held` for an admin, when the "
            "SMS pumping alarm's `hold` action stopped it). A replay of an earlier request "
            "with the same Idempotency-Key carries the header `Idempotent-Replayed: true`. "
            "When the client has limits, `RateLimit` and `RateLimit-Policy` say what is left.",
            "headers": {
                name: RATE_LIMIT_HEADERS[name] for name in ("RateLimit", "RateLimit-Policy")
            },
        },
    },
)
async def send_message(
    request: SendMessageRequest,
    principal: PrincipalDep,
    acceptor: AcceptorDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Accept a message for delivery."""

    def render(results: list[Result]) -> tuple[int, dict[str, Any]]:
        (result,) = results
        if isinstance(result, ServiceError):
            raise result
        return 202, message_json(result)

    response = await accept_messages(
        acceptor,
        principal,
        [_command(request)],
        render=render,
        idempotency=_idempotency(
            acceptor,
            idempotency_key,
            lambda: request.model_dump(mode="json", by_alias=True),
        ),
        batch=False,
    )
    return _respond(response)


@router.post(
    "/batch",
    response_model=BatchResult,
    responses={
        **problem_responses(Unauthorized, Conflict, ValidationFailed),
        200: {
            "description": "Every message was judged on its own: `data` holds, in request "
            "order, each one's `accepted` message (queued, as `POST /v1/messages` answers) or "
            "its `rejected` problem (as `POST /v1/messages` would have answered it). A replay "
            "of an earlier request with the same Idempotency-Key carries the header "
            "`Idempotent-Replayed: true`. A message to a country not permitted is `rejected` "
            "with 403 `destination_not_permitted`; one over the client's limits with 429 "
            "`rate_limited` or `quota_exceeded` (the others are still judged: a smaller one may "
            "fit). When the client has limits, `RateLimit` and `RateLimit-Policy` say what "
            "is left.",
            "headers": {
                name: RATE_LIMIT_HEADERS[name] for name in ("RateLimit", "RateLimit-Policy")
            },
        },
    },
)
async def send_batch(
    request: SendBatchRequest,
    principal: PrincipalDep,
    acceptor: AcceptorDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Accept up to 1,000 messages at once; each is accepted or refused on its own."""

    def render(results: list[Result]) -> tuple[int, dict[str, Any]]:
        accepted = sum(1 for result in results if not isinstance(result, ServiceError))
        return 200, {
            "data": [_batch_result(index, result) for index, result in enumerate(results)],
            "accepted": accepted,
            "rejected": len(results) - accepted,
        }

    # The body as sent: messages that fail validation have no normalised form to compare.
    idempotency = _idempotency(acceptor, idempotency_key, lambda: {"messages": request.messages})
    response = await accept_messages(
        acceptor,
        principal,
        _commands(request.messages),
        render=render,
        idempotency=idempotency,
        batch=True,
    )
    return _respond(response)


def _command(request: SendMessageRequest) -> SendCommand:
    return SendCommand(
        to=request.to,
        body=request.body,
        sender=request.from_,
        callback_url=str(request.callback_url) if request.callback_url else None,
        validity_period=request.validity_period,
        metadata=request.metadata,
        send_at=request.send_at,
        respect_quiet_hours=request.respect_quiet_hours,
    )


def _commands(messages: list[Any]) -> list[SendCommand | ServiceError]:
    """Each message validated on its own, as `POST /v1/messages` validates its body; a message
    that fails gets the 422 that endpoint would give, naming the field within the message."""
    context: dict[str, Any] = {PHONE_CACHE: {}}  # each distinct number is judged once
    commands: list[SendCommand | ServiceError] = []
    for index, raw in enumerate(messages):
        try:
            request = SendMessageRequest.model_validate(raw, context=context)
        except PydanticValidationError as error:
            commands.append(
                ValidationFailed.from_pydantic(
                    error.errors(), request=False, whole=f"messages.{index}"
                )
            )
        else:
            commands.append(_command(request))
    return commands


def _batch_result(index: int, result: Result) -> dict[str, Any]:
    """One entry of a batch's `data`, as `BatchAccepted` or `BatchRejected` documents it."""
    if isinstance(result, ServiceError):
        # As the problem+json handler renders it: absent fields are left out, not null.
        error = result.to_problem().model_dump(exclude_none=True)
        return {"index": index, "status": "rejected", "error": error}
    return {"index": index, "status": "accepted", "message": message_json(result)}


# `MessageOut`'s own validator and serializer, called directly: the same checks and the same JSON
# as `MessageOut.model_validate(row).model_dump(mode="json", by_alias=True)` without those
# methods' Python wrappers, which cost as much again (a batch renders up to 1,000 messages).
_validate_message_out = MessageOut.__pydantic_validator__.validate_python
_dump_message_out = MessageOut.__pydantic_serializer__.to_python


def message_json(fields: dict[str, Any]) -> dict[str, Any]:
    """An accepted message's row as the JSON object `MessageOut` documents."""
    dumped: dict[str, Any] = _dump_message_out(
        _validate_message_out(fields), mode="json", by_alias=True
    )
    return dumped


def _idempotency(
    acceptor: Acceptor, key: str | None, payload: Callable[[], Any]
) -> Idempotency | None:
    """The request's Idempotency-Key (checked: 422 if unusable) and its body's fingerprint
    (`payload` is only worked out when there is a key)."""
    if key is None:
        return None
    check_key(key)
    return Idempotency(
        key=key,
        fingerprint=fingerprint(payload()),
        ttl=timedelta(hours=acceptor.settings.idempotency_ttl_hours),
    )


class _SendResponse(JSONResponse):
    """Starlette's JSON response, encoded by pydantic-core: the same bytes (compact, UTF-8, the
    same escapes), about four times faster. A batch's answer is half a megabyte; encoding it with
    `json.dumps` was a sixth of the API's CPU per batch."""

    def render(self, content: Any) -> bytes:
        """`content` as compact UTF-8 JSON."""
        return pydantic_core.to_json(content)


def _respond(response: StoredResponse) -> JSONResponse:
    """The response, marked when it replays an earlier one."""
    headers = {"Idempotent-Replayed": "true"} if response.replayed else {}
    return _SendResponse(
        response.body, status_code=response.status, headers={**response.headers, **headers}
    )


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


@router.post(
    "/{message_id}/cancel",
    response_model=MessageOut,
    responses={
        **problem_responses(Unauthorized, NotFound),
        200: {
            "description": "Canceled: the message was `scheduled`, `held` or still `queued` and "
            "will never be sent (`status` `canceled`, `error_code` `canceled`). Canceling a "
            "message that is already `canceled` answers the same (for whatever reason it was "
            "canceled)."
        },
        409: {
            "description": "Too late: a delivery attempt already took the message. The code "
            "names its status now: `already_sending`, `already_sent`, `already_delivered`, "
            "`already_undelivered`, `already_failed`, `already_expired` or `already_rejected`.",
            "content": {
                "application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": {
                        "type": "about:blank",
                        "title": "Conflict",
                        "status": 409,
                        "code": "already_sending",
                        "detail": "the message is already sending: only a scheduled, held or "
                        "queued message can be canceled",
                    },
                }
            },
        },
    },
)
async def cancel_message(
    message_id: MessageIdPath, session: SessionDep, principal: PrincipalDep
) -> MessageOut:
    """Cancel a message that is `scheduled` or still `queued` (yours; an admin key: anyone's)."""
    message = await domain.cancel(session, principal, message_id)
    return MessageOut.model_validate(message)


@router.get(
    "/{message_id}",
    response_model=MessageDetail,
    responses=problem_responses(Unauthorized, NotFound),
)
async def get_message(
    message_id: MessageIdPath, session: SessionDep, principal: PrincipalDep
) -> MessageDetail:
    """A message with its status history and the notes on it."""
    message, events = await domain.get_message(session, principal, message_id)
    return MessageDetail(
        **MessageOut.model_validate(message).model_dump(),
        history=[StatusChange.model_validate(event) for event in events if event.applied],
        notes=[HistoryNote.model_validate(event) for event in events if not event.applied],
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
