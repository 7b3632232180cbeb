"""/2010-04-01/Accounts/{AccountSid}/Messages: Twilio's Messages API over our pipeline.

A Twilio SDK pointed at the service works unchanged. Each form becomes the `SendMessageRequest`
`POST /v1/messages` validates and the same `SendCommand`, accepted by the same
`accept_messages` (senders, opt-outs, idempotency, isolation); results and refusals are
translated by `app.twilio_api.vocabulary`. Errors are answered in Twilio's shape by this router's
route class, whatever raised them (authentication, parameters, the pipeline).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import (
    APIRouter,
    Depends,
    Form,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import ValidationError as PydanticValidationError

from app.access.auth import Principal
from app.db.session import AFTER_COMMIT
from app.delivery.transitions import cancel_queued
from app.kernel.errors import Forbidden, NotFound, ServiceError, Unauthorized, ValidationFailed
from app.kernel.errors import problem_responses as _problems
from app.kernel.settings import Settings
from app.sending import messages as domain
from app.sending.accept import Idempotency, Result, SendCommand, accept_messages
from app.sending.idempotency import check_key, fingerprint
from app.sending.schemas import SendMessageRequest
from app.twilio_api import vocabulary as twilio
from app.twilio_api.schemas import (
    CreateMessageForm,
    TwilioCredentialsIn,
    TwilioCredentialsOut,
    TwilioErrorBody,
    TwilioMessage,
    TwilioMessagePage,
    UpdateMessageForm,
)
from app.web.deps import AcceptorDep, AdminDep, LookupsDep, SessionDep

PREFIX = f"/{twilio.API_VERSION}/Accounts/{{AccountSid}}"
IDEMPOTENCY_PREFIX = "twilio:"


class TwilioRoute(APIRoute):
    """Answers every error of its operations as Twilio does: `{code, message, more_info,
    status}` (authentication, parameters, and the shared pipeline's refusals)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The operation's handler, with its errors translated."""
        handle = super().get_route_handler()

        async def translated(request: Request) -> Response:
            try:
                return await handle(request)
            except twilio.TwilioError as error:
                return _error(error)
            except ServiceError as error:
                response = _error(twilio.from_service_error(error))
                if error.status == 429:  # when to retry, and the limits (app.traffic.quotas)
                    response.headers.update(error.headers)
                return response
            except RequestValidationError as error:
                return _error(_parameter_error(error))
            except HTTPException as error:  # FastAPI's own: a malformed Basic header (401)
                if error.status_code == 401:
                    return _error(twilio.authentication_failed())
                raise

        return translated


def _error(error: twilio.TwilioError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="smsgate"'} if error.status == 401 else {}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _parameter_error(error: RequestValidationError) -> twilio.TwilioError:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ())][1:]
    name = ".".join(location) or "request"
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return twilio.refusal("invalid_parameter", f"Invalid parameter: {name}: {reason}")


def twilio_answers(openapi: dict[str, Any]) -> dict[str, Any]:
    """The Twilio operations answer invalid parameters with a Twilio 400, never FastAPI's 422:
    drop the 422 FastAPI documents for them."""
    for path, item in openapi.get("paths", {}).items():
        if path.startswith(f"/{twilio.API_VERSION}/"):
            for operation in item.values():
                operation.get("responses", {}).pop("422", None)
    return openapi


router = APIRouter(prefix=PREFIX, tags=["twilio-compatible"], route_class=TwilioRoute)
admin_router = APIRouter(prefix="/v1/twilio-credentials", tags=["twilio-compatible"])

_basic = HTTPBasic(
    auto_error=False,
    description="Your account SID as the username and your auth token as the password "
    "(issued by `POST /v1/twilio-credentials`).",
)

AccountSidPath = Annotated[
    str,
    Path(
        alias="AccountSid",
        max_length=34,
        description="Your account SID (the username you authenticate with).",
        examples=["AC0f8e5c1e2b7a4d579a0c7c1d2e3f4a5b"],
    ),
]
MessageSidPath = Annotated[
    str,
    Path(
        alias="Sid",
        max_length=34,
        description="The message's SID (`SM` + its id in hex).",
        examples=["SM5b0e8f0a3c2d4c559a510c6d2f1c9f10"],
    ),
]


async def twilio_principal(
    request: Request,
    lookups: LookupsDep,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> Principal:
    """The client whose account SID and auth token authenticate the request; the SID in the
    path must be the same account (else 20003, as for a wrong token)."""
    if credentials is None:
        raise twilio.authentication_failed()
    path_sid = request.path_params.get("AccountSid", "")
    if credentials.username != path_sid:
        raise twilio.authentication_failed()
    principal = await lookups.twilio_principal(credentials.username, credentials.password)
    if principal is None:
        raise twilio.authentication_failed()
    return principal


TwilioPrincipalDep = Annotated[Principal, Depends(twilio_principal)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": TwilioErrorBody, "description": description}
    for status, description in (
        (400, "Invalid parameters, or a refusal (Twilio's code in `code`)"),
        (401, "Authenticate (20003)"),
        (404, "Not found (20404)"),
        (503, "Service unavailable (20503)"),
    )
}


IdempotencyTokenHeader = Annotated[
    str | None,
    Header(
        alias="I-Twilio-Idempotency-Token",
        description="As `Idempotency-Key` on `/v1/messages`: a retry with the same token "
        "and parameters answers the first response and sends nothing new.",
        examples=["order-1042-shipped"],
    ),
]


def _form_value(value: str | None) -> str | None:
    return value if value not in (None, "") else None


@router.post(
    "/Messages.json",
    status_code=201,
    response_model=TwilioMessage,
    responses={
        **_ERRORS,
        409: {
            "model": TwilioErrorBody,
            "description": "The I-Twilio-Idempotency-Token's first request is still running",
        },
    },
    summary="Send a message (Twilio's CreateMessage)",
)
async def create_message(
    account_sid: AccountSidPath,
    principal: TwilioPrincipalDep,
    acceptor: AcceptorDep,
    form: Annotated[CreateMessageForm, Form()],
    idempotency_token: IdempotencyTokenHeader = None,
) -> Any:
    """Accept a message, as `POST /v1/messages` does; unknown parameters are ignored."""
    _refuse_unsupported(
        send_at=form.send_at,
        schedule_type=form.schedule_type,
        media=bool(form.media_url) or bool(form.content_sid),
    )
    command, parameters = _command(
        to=_form_value(form.to),
        from_=_form_value(form.from_),
        body=form.body,
        status_callback=_form_value(form.status_callback),
        validity_period=_form_value(form.validity_period),
    )

    def render(results: list[Result]) -> tuple[int, dict[str, Any]]:
        (result,) = results
        if isinstance(result, ServiceError):
            raise result
        return 201, twilio.resource(result, account_sid)

    idempotency = None
    if idempotency_token is not None:
        idempotency = _idempotency(idempotency_token, parameters, acceptor.settings)
    response = await accept_messages(
        acceptor, principal, [command], render=render, idempotency=idempotency, batch=False
    )
    # The quota's RateLimit headers, as a /v1 send's (none on a replay).
    headers = {"Idempotent-Replayed": "true"} if response.replayed else {}
    return JSONResponse(
        response.body, status_code=response.status, headers={**response.headers, **headers}
    )


def _idempotency(token: str, parameters: dict[str, Any], settings: Settings) -> Idempotency:
    """The I-Twilio-Idempotency-Token as the pipeline's idempotency key."""
    key = IDEMPOTENCY_PREFIX + token
    check_key(key)
    return Idempotency(
        key=key,
        # Marked as this API's: a /v1 request naming the same key with the same body is a
        # reuse of the key (422), never a replay of this Twilio-shaped answer.
        fingerprint=fingerprint({"api": "twilio", "request": parameters}),
        ttl=timedelta(hours=settings.idempotency_ttl_hours),
    )


def _refuse_unsupported(*, send_at: str | None, schedule_type: str | None, media: bool) -> None:
    """Parameters asking for what this API does not do are refused, never ignored: a
    message sent now, or without its media, is not what was asked for."""
    if send_at or schedule_type:
        raise twilio.refusal(
            "invalid_parameter",
            "Invalid parameter: SendAt/ScheduleType: the Twilio-compatible API does not take "
            "SendAt; schedule with POST /v1/messages and its send_at",
        )
    if media:
        raise twilio.refusal(
            "invalid_parameter",
            "Invalid parameter: MediaUrl/ContentSid: this service sends SMS text only",
        )


def _command(
    *,
    to: str | None,
    from_: str | None,
    body: str | None,
    status_callback: str | None,
    validity_period: str | None,
) -> tuple[SendCommand, dict[str, Any]]:
    """The form as `POST /v1/messages` would have been asked: validated by the same model,
    refused with Twilio's codes. Returns the command and what its idempotency compares."""
    if to is None:
        raise twilio.refusal("missing_to", "A 'To' phone number is required.")
    if not body:
        raise twilio.refusal("missing_body", "A message body is required.")
    raw: dict[str, Any] = {"to": to, "body": body}
    if from_ is not None:
        raw["from"] = from_
    if status_callback is not None:
        raw["callback_url"] = status_callback
    if validity_period is not None:
        try:
            raw["validity_period"] = int(validity_period)
        except ValueError:
            raise twilio.refusal(
                "invalid_validity_period", "ValidityPeriod: not an integer"
            ) from None
    try:
        request = SendMessageRequest.model_validate(raw)
    except PydanticValidationError as error:
        if any(
            item["loc"] == ("body",) and item["type"] == "string_too_long"
            for item in error.errors()
        ):
            raise twilio.refusal("body_too_long", "Body: too long") from None
        raise twilio.from_service_error(
            ValidationFailed.from_pydantic(error.errors(), request=False)
        ) from None
    command = SendCommand(
        to=request.to,
        body=request.body,
        sender=request.from_,
        callback_url=str(request.callback_url) if request.callback_url else None,
        validity_period=request.validity_period,
        api="twilio",
    )
    return command, request.model_dump(mode="json", by_alias=True)


def _message_id(sid: str) -> uuid.UUID:
    message_id = twilio.parse_sid(sid, twilio.MESSAGE_PREFIX)
    if message_id is None:
        raise twilio.refusal("not_found", f"The requested resource {sid} was not found")
    return message_id


@router.get(
    "/Messages/{Sid}.json",
    response_model=TwilioMessage,
    responses=_ERRORS,
    summary="Fetch a message (Twilio's FetchMessage)",
)
async def fetch_message(
    account_sid: AccountSidPath,
    sid: MessageSidPath,
    session: SessionDep,
    principal: TwilioPrincipalDep,
) -> Any:
    """One of your messages."""
    message, _ = await domain.get_message(session, principal, _message_id(sid))
    return JSONResponse(twilio.resource(message, account_sid))


@router.post(
    "/Messages/{Sid}.json",
    response_model=TwilioMessage,
    responses=_ERRORS,
    summary="Cancel a queued message (Twilio's UpdateMessage with Status=canceled)",
)
async def update_message(
    account_sid: AccountSidPath,
    sid: MessageSidPath,
    session: SessionDep,
    principal: TwilioPrincipalDep,
    form: Annotated[UpdateMessageForm, Form()],
) -> Any:
    """Cancel a message still queued (30409 once an attempt has taken it); redacting a body
    (`Body=`) is not supported."""
    message_id = _message_id(sid)
    if form.body is not None:
        raise twilio.refusal(
            "invalid_parameter", "Invalid parameter: Body: redacting a message is not supported"
        )
    if form.status != "canceled":
        raise twilio.refusal("invalid_parameter", "Invalid parameter: Status: only 'canceled'")
    if not await cancel_queued(session, principal.client_id, message_id):
        raise twilio.refusal("cannot_cancel", "This message cannot be canceled")
    message, _ = await domain.get_message(session, principal, message_id)
    return JSONResponse(twilio.resource(message, account_sid))


def _date_query(alias: str, meaning: str) -> Any:
    return Query(
        alias=alias,
        max_length=40,
        description=f"Messages {meaning} a GMT date (`YYYY-MM-DD`) or an ISO 8601 time, compared "
        "with the message's creation (a send leaves within seconds of it).",
        examples=["2026-11-26"],
    )


ToQuery = Annotated[
    str | None,
    Query(alias="To", max_length=40, description="Only to this number.", examples=["+14155550123"]),
]
FromQuery = Annotated[
    str | None,
    Query(
        alias="From",
        max_length=40,
        description="Only from this sender.",
        examples=["+14155550100"],
    ),
]
PageSizeQuery = Annotated[
    int,
    Query(alias="PageSize", ge=1, le=1000, description="Messages per page.", examples=[50]),
]
PageQuery = Annotated[
    int,
    Query(
        alias="Page",
        ge=0,
        le=1_000_000,
        description="The page's number, as `next_page_uri` gives it (with its PageToken).",
        examples=[0],
    ),
]
PageTokenQuery = Annotated[
    str | None,
    Query(
        alias="PageToken",
        max_length=200,
        description="From `next_page_uri`.",
        examples=["MjAyNi0xMS0yNlQxMDowMDowMCswMDowMHw1YjBl"],
    ),
]


@router.get(
    "/Messages.json",
    response_model=TwilioMessagePage,
    responses=_ERRORS,
    summary="List messages (Twilio's ListMessage)",
)
async def list_messages(
    request: Request,
    account_sid: AccountSidPath,
    session: SessionDep,
    principal: TwilioPrincipalDep,
    to: ToQuery = None,
    from_: FromQuery = None,
    date_sent: Annotated[str | None, _date_query("DateSent", "of")] = None,
    date_sent_before: Annotated[str | None, _date_query("DateSent<", "on or before")] = None,
    date_sent_after: Annotated[str | None, _date_query("DateSent>", "on or after")] = None,
    page_size: PageSizeQuery = 50,
    page: PageQuery = 0,
    page_token: PageTokenQuery = None,
) -> Any:
    """Your messages, newest first, `PageSize` at a time; follow `next_page_uri`."""
    if page > 0 and page_token is None:
        raise twilio.refusal(
            "invalid_parameter",
            "Invalid parameter: Page: later pages are read with the PageToken of next_page_uri",
        )
    after, before = _date_range(date_sent, date_sent_before, date_sent_after)
    result = await domain.list_messages(
        session,
        principal.client_id,
        domain.MessageFilter(to=to, from_=from_, created_after=after, created_before=before),
        limit=page_size,
        cursor=page_token,
    )
    filters = {
        name: value
        for name, value in (
            ("To", to),
            ("From", from_),
            ("DateSent", date_sent),
            ("DateSent<", date_sent_before),
            ("DateSent>", date_sent_after),
        )
        if value is not None
    }
    return JSONResponse(
        _page(result, account_sid, filters, page, page_size, query=request.url.query)
    )


def _page(
    result: domain.Page,
    account_sid: str,
    filters: dict[str, str],
    page: int,
    page_size: int,
    *,
    query: str,
) -> dict[str, Any]:
    """A ListMessage page, with the URIs of its first and next pages (same filters)."""
    path = f"/{twilio.API_VERSION}/Accounts/{account_sid}/Messages.json"

    def uri(**extra: Any) -> str:
        return f"{path}?{urlencode({**filters, 'PageSize': page_size, **extra})}"

    messages = [twilio.resource(message, account_sid) for message in result.items]
    start = page * page_size
    return {
        "messages": messages,
        "end": start + max(len(messages) - 1, 0),
        "first_page_uri": uri(Page=0),
        "next_page_uri": (
            uri(Page=page + 1, PageToken=result.next_cursor) if result.next_cursor else None
        ),
        "previous_page_uri": None,
        "page": page,
        "page_size": page_size,
        "start": start,
        "uri": f"{path}?{query}" if query else path,
    }


def _date_range(
    on: str | None, before: str | None, after: str | None
) -> tuple[datetime | None, datetime | None]:
    """(from, until) of the DateSent filters: a day is the whole day; `DateSent<` is on or
    before, `DateSent>` on or after, as Twilio reads them."""
    start: datetime | None = None
    end: datetime | None = None
    if on is not None:
        day, whole_day = _moment(on, "DateSent")
        start, end = day, day + (timedelta(days=1) if whole_day else timedelta(microseconds=1))
    if before is not None:
        moment, whole_day = _moment(before, "DateSent<")
        limit = moment + (timedelta(days=1) if whole_day else timedelta(microseconds=1))
        end = limit if end is None else min(end, limit)
    if after is not None:
        moment, _ = _moment(after, "DateSent>")
        start = moment if start is None else max(start, moment)
    return start, end


def _moment(text: str, parameter: str) -> tuple[datetime, bool]:
    """The moment, and whether it names a whole day: a date, or midnight GMT (the SDKs send a
    date as `YYYY-MM-DDT00:00:00Z`)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC), True
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise twilio.refusal(
            "invalid_parameter", f"Invalid parameter: {parameter}: not a date or an ISO 8601 time"
        ) from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment, moment.astimezone(UTC).time() == time()


@admin_router.post(
    "",
    status_code=201,
    response_model=TwilioCredentialsOut,
    responses=_problems(Unauthorized, Forbidden, NotFound),
)
async def issue_twilio_credentials(
    request: TwilioCredentialsIn, session: SessionDep, _admin: AdminDep, lookups: LookupsDep
) -> TwilioCredentialsOut:
    """Issue a client's Twilio account SID and auth token (replacing any earlier token)."""
    sid, token = await twilio.issue_credentials(session, request.client)
    session.info.setdefault(AFTER_COMMIT, []).append(lookups.forget_principals)
    return TwilioCredentialsOut(client=request.client, account_sid=sid, auth_token=token)
