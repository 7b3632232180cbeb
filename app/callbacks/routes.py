"""Provider webhooks: verify the signature, record the report or the message, acknowledge.

The routes are generic (`/v1/webhooks/{provider}/status` and `/inbound`): which providers take
them, with which methods, and what they are answered is each provider's registry entry
(app.providers.registry), and the adapter verifies and parses the call.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from starlette.exceptions import HTTPException

from app.inbound.service import receive_inbound
from app.kernel.errors import PROBLEM_JSON, Forbidden, NotFound, ValidationFailed, problem_responses
from app.kernel.metrics import WEBHOOK_VERIFICATION_FAILURES
from app.kernel.settings import Settings
from app.providers.base import CallbackRequest, InvalidCallback, Provider
from app.providers.registry import PROVIDERS, WebhookReply
from app.web.deps import ProvidersDep, SessionDep, SettingsDep, StatusRecorderDep

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

_METHOD_NOT_ALLOWED: dict[str, Any] = {
    "description": "Method Not Allowed: this provider calls the webhook with another method.",
    "content": {
        PROBLEM_JSON: {
            "schema": {"$ref": "#/components/schemas/Problem"},
            "example": {
                "type": "about:blank",
                "title": "Method Not Allowed",
                "status": 405,
                "code": "method_not_allowed",
                "detail": "Method Not Allowed",
            },
        }
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    **problem_responses(Forbidden, NotFound, ValidationFailed),
    405: _METHOD_NOT_ALLOWED,
}
_RESPONSES = {
    **_ERRORS,
    204: {"description": "Recorded (or a duplicate, or for an unknown message)."},
}


def _inbound_responses() -> dict[int | str, dict[str, Any]]:
    """The inbound answers: 204, and each reply a provider's entry asks for instead (Twilio's
    empty TwiML), documented from the registry."""
    responses: dict[int | str, dict[str, Any]] = {
        **_ERRORS,
        204: {"description": "Recorded (providers that want no body back)."},
    }
    for entry in PROVIDERS:
        reply = entry.webhooks.inbound_reply
        if reply.status_code == 204 or not entry.webhooks.inbound:
            continue
        documented = responses.setdefault(
            reply.status_code,
            {"description": "Recorded; answered as the provider expects.", "content": {}},
        )
        documented["description"] += f" {entry.name}: {reply.media_type}."
        documented["content"][reply.media_type or "text/plain"] = {"example": reply.body}
    return responses


_INBOUND_RESPONSES = _inbound_responses()


class _WebhookProviders:
    """The path parameter's JSON schema: the providers taking webhooks when the OpenAPI
    document is built (an unregistered name is a 404 problem, not a 422)."""

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return handler(source)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["enum"] = PROVIDERS.with_webhooks()
        return json_schema


ProviderPath = Annotated[
    str,
    _WebhookProviders(),
    Path(description="The provider calling, as registered.", examples=["twilio"]),
]


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


def _accepting(provider_name: str, kind: str, method: str) -> WebhookReply:
    """What a registered provider's webhook of this kind is answered with, once it is known to
    take it with this method; else 404 (no such provider or webhook) or 405 (another method)."""
    entry = PROVIDERS.get(provider_name)
    methods = () if entry is None else getattr(entry.webhooks, kind)
    if not methods:
        raise NotFound(
            "unknown_provider", f"no provider named {provider_name!r} takes {kind} webhooks"
        )
    if method not in methods:
        raise HTTPException(405, headers={"Allow": ", ".join(methods)})
    assert entry is not None
    return entry.webhooks.inbound_reply if kind == "inbound" else WebhookReply()


async def _verified(
    provider_name: str, request: Request, providers: dict[str, Provider], public_base_url: str
) -> tuple[Provider, CallbackRequest]:
    """The provider and its callback, once the signature checks out; else 403 (also for a
    registered provider this process has no credentials for)."""
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
    reply = _accepting(provider_name, "status", request.method)
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
    return _reply(reply)


def _reply(reply: WebhookReply) -> Response:
    if reply.status_code == 204:
        return Response(status_code=204)
    return Response(reply.body, status_code=reply.status_code, media_type=reply.media_type)


@router.post("/{provider}/status", status_code=204, responses=_RESPONSES)
async def provider_status(
    provider: ProviderPath,
    request: Request,
    record: StatusRecorderDep,
    providers: ProvidersDep,
    settings: SettingsDep,
) -> Response:
    """A provider's delivery report (Twilio's StatusCallback, form-encoded, signed with
    X-Twilio-Signature; Vonage's receipt, form or JSON fields, signed with `sig`)."""
    return await _handle_status(provider, request, record, providers, settings.public_base_url)


@router.get("/{provider}/status", status_code=204, responses=_RESPONSES)
async def provider_status_get(
    provider: ProviderPath,
    request: Request,
    record: StatusRecorderDep,
    providers: ProvidersDep,
    settings: SettingsDep,
) -> Response:
    """A delivery report as a GET, for providers that call so (Vonage: query parameters,
    signed with `sig`); 405 for the others."""
    return await _handle_status(provider, request, record, providers, settings.public_base_url)


async def _handle_inbound(
    provider_name: str,
    request: Request,
    session: SessionDep,
    providers: dict[str, Provider],
    settings: Settings,
) -> Response:
    reply = _accepting(provider_name, "inbound", request.method)
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
    return _reply(reply)


@router.post("/{provider}/inbound", response_class=Response, responses=_INBOUND_RESPONSES)
async def provider_inbound(
    provider: ProviderPath,
    request: Request,
    session: SessionDep,
    providers: ProvidersDep,
    settings: SettingsDep,
) -> Response:
    """A customer's message to one of our numbers (Twilio: form-encoded, signed, answered with
    empty TwiML; Vonage: form or JSON, signed with `sig`)."""
    return await _handle_inbound(provider, request, session, providers, settings)


@router.get("/{provider}/inbound", response_class=Response, responses=_INBOUND_RESPONSES)
async def provider_inbound_get(
    provider: ProviderPath,
    request: Request,
    session: SessionDep,
    providers: ProvidersDep,
    settings: SettingsDep,
) -> Response:
    """A customer's message as a GET, for providers that call so (Vonage, signed with `sig`);
    405 for the others."""
    return await _handle_inbound(provider, request, session, providers, settings)


# Methods no provider calls with: answered from the registry too (404 for an unknown provider,
# else 405 naming the methods its entry takes), not from whichever route happens to match first.
_OTHER_METHODS = ["DELETE", "HEAD", "OPTIONS", "PATCH", "PUT"]


@router.api_route("/{provider}/{kind}", methods=_OTHER_METHODS, include_in_schema=False)
async def provider_other_method(provider: str, kind: str, request: Request) -> Response:
    """404 or 405, as `_accepting` decides; never a webhook call."""
    if kind not in ("status", "inbound"):
        raise HTTPException(404)
    _accepting(provider, kind, request.method)
    raise HTTPException(405)  # unreachable: no entry takes these methods
