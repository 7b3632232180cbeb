"""Provider status callbacks: verify the signature, record the report, acknowledge."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request, Response

from app.inbound.service import receive_inbound
from app.kernel.errors import Forbidden, ValidationFailed, problem_responses
from app.kernel.metrics import WEBHOOK_VERIFICATION_FAILURES
from app.kernel.settings import Settings
from app.providers.base import CallbackRequest, InvalidCallback, Provider
from app.web.deps import ProvidersDep, SessionDep, SettingsDep, StatusRecorderDep

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

_RESPONSES = {
    **problem_responses(Forbidden, ValidationFailed),
    204: {"description": "Recorded (or a duplicate, or for an unknown message)."},
}


async def _callback_request(request: Request, public_base_url: str) -> CallbackRequest:
    """The callback as the provider sent it, with the public URL it signed."""
    body = await request.body()
    params: dict[str, str] = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and content_type.startswith("application/json"):
        try:
            document = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            raise ValidationFailed("invalid_callback", "the body is not valid JSON") from None
        if not isinstance(document, dict):
            raise ValidationFailed("invalid_callback", "the body is not a JSON object")
        params |= {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in document.items()
        }
    elif request.method == "POST":
        form = await request.form()
        params = {key: value for key, value in form.items() if isinstance(value, str)}
    url = public_base_url.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    headers = {key.lower(): value for key, value in request.headers.items()}
    return CallbackRequest(
        url=url, method=request.method, params=params, headers=headers, body=body
    )


async def _verified(
    provider_name: str, request: Request, providers: dict[str, Provider], public_base_url: str
) -> tuple[Provider, CallbackRequest]:
    """The provider and its callback, once the signature checks out; else 403."""
    provider = providers.get(provider_name)
    callback = await _callback_request(request, public_base_url)
    if provider is None or not provider.verify_callback(callback):
        # Logged, never acted on: an unsigned request could forge a delivery or an opt-out.
        kind = request.url.path.rsplit("/", 1)[-1]
        WEBHOOK_VERIFICATION_FAILURES.labels(provider=provider_name, kind=kind).inc()
        log.warning("callback signature rejected", extra={"provider": provider_name, "kind": kind})
        raise Forbidden("invalid_signature", "the request is not signed by the provider")
    return provider, callback


async def _handle_status(
    provider_name: str,
    request: Request,
    record: StatusRecorderDep,
    providers: dict[str, Provider],
    public_base_url: str,
) -> Response:
    provider, callback = await _verified(provider_name, request, providers, public_base_url)
    try:
        report = provider.parse_status_callback(callback)
    except InvalidCallback as error:
        raise ValidationFailed("invalid_callback", str(error)) from None
    if not await record(provider_name, report):
        log.info(
            "status report for an unknown message",
            extra={"provider": provider_name, "provider_message_id": report.provider_message_id},
        )
    return Response(status_code=204)


@router.post("/twilio/status", status_code=204, responses=_RESPONSES)
async def twilio_status(
    request: Request, record: StatusRecorderDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """Twilio's StatusCallback (form-encoded, signed with X-Twilio-Signature)."""
    return await _handle_status("twilio", request, record, providers, settings.public_base_url)


@router.get("/vonage/status", status_code=204, responses=_RESPONSES)
async def vonage_status_get(
    request: Request, record: StatusRecorderDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """Vonage's delivery receipt as a GET (query parameters, signed with `sig`)."""
    return await _handle_status("vonage", request, record, providers, settings.public_base_url)


@router.post("/vonage/status", status_code=204, responses=_RESPONSES)
async def vonage_status_post(
    request: Request, record: StatusRecorderDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """Vonage's delivery receipt as a POST (form or JSON fields, signed with `sig`)."""
    return await _handle_status("vonage", request, record, providers, settings.public_base_url)


async def _handle_inbound(
    provider_name: str,
    request: Request,
    session: SessionDep,
    providers: dict[str, Provider],
    settings: Settings,
) -> None:
    provider, callback = await _verified(
        provider_name, request, providers, settings.public_base_url
    )
    try:
        inbound = provider.parse_inbound(callback)
    except InvalidCallback as error:
        raise ValidationFailed("invalid_callback", str(error)) from None
    await receive_inbound(
        session,
        provider_name,
        inbound,
        default_region=settings.default_region,
        opt_out_scope=settings.opt_out_scope,
    )


# Twilio reads the response as TwiML; an empty <Response> sends nothing back by itself, since
# replies go through our own outbound path (each with an id and a status).
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


@router.post(
    "/twilio/inbound",
    response_class=Response,
    responses={
        **problem_responses(Forbidden, ValidationFailed),
        200: {
            "description": "Recorded; an empty TwiML response.",
            "content": {"text/xml": {"example": EMPTY_TWIML}},
        },
    },
)
async def twilio_inbound(
    request: Request, session: SessionDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """A customer's message to one of our Twilio numbers (form-encoded, signed)."""
    await _handle_inbound("twilio", request, session, providers, settings)
    return Response(EMPTY_TWIML, media_type="text/xml")


@router.get("/vonage/inbound", status_code=204, responses=_RESPONSES)
async def vonage_inbound_get(
    request: Request, session: SessionDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """A customer's message to one of our Vonage numbers, as a GET (signed with `sig`)."""
    await _handle_inbound("vonage", request, session, providers, settings)
    return Response(status_code=204)


@router.post("/vonage/inbound", status_code=204, responses=_RESPONSES)
async def vonage_inbound_post(
    request: Request, session: SessionDep, providers: ProvidersDep, settings: SettingsDep
) -> Response:
    """A customer's message to one of our Vonage numbers, as a POST (form or JSON, signed)."""
    await _handle_inbound("vonage", request, session, providers, settings)
    return Response(status_code=204)
