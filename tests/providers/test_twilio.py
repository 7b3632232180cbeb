"""The Twilio adapter against Twilio's published contract, with no network.

Requests are checked against the CreateMessage operation extracted from Twilio's OpenAPI description
(`tests/fixtures/twilio_create_message.json`); signatures are recomputed here from the documented
algorithm, independently of the adapter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from pydantic import SecretStr

from app.kernel.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    Encoding,
    ErrorKind,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    ProviderError,
)
from app.providers.twilio import TwilioProvider, TwilioSettings, compute_signature
from tests.fixtures.extract_twilio_schema import FIXTURE

SPEC: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PUBLIC_BASE_URL = "https://sms.example.com"
MESSAGE_ID = uuid.UUID("6f1c2b8e-3a5d-4e7f-9b0a-1c2d3e4f5a6b")
MESSAGE_SID = "SM" + "a1b2c3d4e5f60718293a4b5c6d7e8f90"
CALLBACK_URL = f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id={MESSAGE_ID}"

Handler = Callable[[httpx.Request], httpx.Response]


def make_sms(**changes: Any) -> OutboundSms:
    fields: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "to": "+14155550123",
        "sender": "+14155552345",
        "body": "Your code is 123456",
        "encoding": Encoding.GSM7,
        "validity_seconds": None,
    }
    fields.update(changes)
    return OutboundSms(**fields)


def make_provider(
    http: httpx.AsyncClient | None = None,
    *,
    account_sid: str = ACCOUNT_SID,
    auth_token: str = AUTH_TOKEN,
) -> TwilioProvider:
    settings = TwilioSettings(account_sid=account_sid, auth_token=SecretStr(auth_token))
    return TwilioProvider(settings, http or httpx.AsyncClient(), PUBLIC_BASE_URL)


async def send(handler: Handler, sms: OutboundSms | None = None, **provider_args: Any) -> Accepted:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        return await make_provider(http, **provider_args).send(sms or make_sms())


async def send_error(handler: Handler, sms: OutboundSms | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await send(handler, sms)
    return caught.value


# --- the spec, as JSON Schema ------------------------------------------------------------------


def as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` spelled the JSON Schema way (`type: [T, "null"]`)."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


def coerce(values: list[str], schema: Mapping[str, Any]) -> Any:
    """A form field's text in the type its schema declares; unparseable text stays a string."""
    kind = schema.get("type")
    if kind == "array":
        return [coerce([value], schema.get("items", {})) for value in values]
    assert len(values) == 1, f"scalar field sent {len(values)} times"
    value = values[0]
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
    except ValueError:
        return value
    if kind == "boolean":
        return {"true": True, "false": False}.get(value, value)
    return value


def assert_valid_create_message(request: httpx.Request) -> dict[str, Any]:
    """The request's form fields; fails unless the request is a valid CreateMessage call."""
    assert request.method == SPEC["method"]

    names_and_literals = re.split(r"\{(\w+)\}", SPEC["path"])
    path_regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
        for i, part in enumerate(names_and_literals)
    )
    match = re.fullmatch(path_regex, request.url.path)
    assert match, f"{request.url.path} is not {SPEC['path']}"
    for parameter in SPEC["path_parameters"]:
        jsonschema.validate(match[parameter["name"]], parameter["schema"])

    scheme = SPEC["security_scheme"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "basic")
    kind, _, credentials = request.headers.get("authorization", "").partition(" ")
    assert kind == "Basic"
    username, _, password = base64.b64decode(credentials).decode().partition(":")
    assert (username, password) == (match["AccountSid"], AUTH_TOKEN)

    assert request.headers["content-type"] == SPEC["request_content_type"]
    body_schema = SPEC["request_body_schema"]
    raw = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    form = {
        name: coerce(values, body_schema["properties"].get(name, {}))
        for name, values in raw.items()
    }
    # The spec leaves additionalProperties open; Twilio ignores unknown fields, so a misspelled
    # one would silently drop a setting. Closing the schema makes that a test failure.
    jsonschema.validate(form, {**as_json_schema(body_schema), "additionalProperties": False})

    # Constraints the spec states only in prose.
    assert re.fullmatch(r"\+[1-9]\d{1,14}", form["To"]), "To must be E.164"
    callback = urlsplit(form["StatusCallback"])
    assert callback.scheme in {"http", "https"} and callback.hostname
    assert "_" not in callback.hostname, "Twilio refuses StatusCallback hosts with underscores"
    if "ValidityPeriod" in form:
        assert 1 <= form["ValidityPeriod"] <= 36000
    return form


def message_body(**changes: Any) -> dict[str, Any]:
    """A 201 body shaped like the spec's `api.v2010.account.message` (its `create` example)."""
    uri = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{MESSAGE_SID}"
    body: dict[str, Any] = {
        "account_sid": ACCOUNT_SID,
        "api_version": "2010-04-01",
        "body": "Your code is 123456",
        "date_created": "Thu, 24 Aug 2023 05:01:45 +0000",
        "date_sent": None,
        "date_updated": "Thu, 24 Aug 2023 05:01:45 +0000",
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": "+14155552345",
        "messaging_service_sid": None,
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "sid": MESSAGE_SID,
        "status": "queued",
        "subresource_uris": {"media": f"{uri}/Media.json"},
        "to": "+14155550123",
        "uri": f"{uri}.json",
    }
    body.update(changes)
    return body


def created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json=message_body())


# --- the request -------------------------------------------------------------------------------


def test_the_fixture_names_its_source() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", SPEC["source"]["commit"])
    assert SPEC["operation_id"] == "CreateMessage"


def test_the_example_response_body_is_valid_against_the_spec() -> None:
    jsonschema.validate(message_body(), as_json_schema(SPEC["response_schema"]))


async def test_send_posts_a_create_message_request_valid_against_the_spec() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return created(request)

    accepted = await send(handler)

    assert accepted == Accepted(provider_message_id=MESSAGE_SID)
    (request,) = seen
    assert f"{request.url.scheme}://{request.url.host}" == SPEC["servers"][0]["url"]
    assert request.url.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    form = assert_valid_create_message(request)
    assert form == {
        "To": "+14155550123",
        "From": "+14155552345",
        "Body": "Your code is 123456",
        "StatusCallback": CALLBACK_URL,
    }


async def test_the_status_callback_url_leads_back_to_the_message() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return created(request)

    await send(handler)
    callback_url = assert_valid_create_message(seen[0])["StatusCallback"]
    params = {"MessageSid": MESSAGE_SID, "MessageStatus": "delivered"}
    request = callback(params, url=callback_url)
    provider = make_provider()
    assert provider.verify_callback(request)
    assert provider.parse_status_callback(request).message_id == MESSAGE_ID


@pytest.mark.parametrize(
    ("validity_seconds", "sent"),
    [
        (None, None),
        (300, 300),
        (36000, 36000),
        (1, 1),
        (0, 1),  # below the documented minimum: the shortest Twilio allows
        (-5, 1),
        (86400, 36000),  # above the documented maximum: what Twilio would apply anyway
    ],
)
async def test_validity_period_is_sent_within_the_documented_range(
    validity_seconds: int | None, sent: int | None
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return created(request)

    await send(handler, make_sms(validity_seconds=validity_seconds))
    form = assert_valid_create_message(seen[0])
    assert form.get("ValidityPeriod") == sent


def test_the_validity_range_is_still_what_the_spec_says() -> None:
    description = SPEC["request_body_schema"]["properties"]["ValidityPeriod"]["description"]
    assert "from `1` to `36000`" in description


def test_the_spec_check_refuses_a_misspelled_field() -> None:
    request = httpx.Request(
        "POST",
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        data={"To": "+14155550123", "Form": "+14155552345", "Body": "hi"},
        headers={"Authorization": _basic(ACCOUNT_SID, AUTH_TOKEN)},
    )
    with pytest.raises(jsonschema.ValidationError, match="'Form' was unexpected"):
        assert_valid_create_message(request)


@pytest.mark.parametrize("account_sid", ["AC123", "XX" + "0" * 32, "AC" + "g" * 32])
def test_the_spec_check_refuses_a_bad_account_sid(account_sid: str) -> None:
    request = httpx.Request(
        "POST",
        f"https://api.twilio.com/2010-04-01/Accounts/{account_sid}/Messages.json",
        data={"To": "+14155550123", "From": "+14155552345", "Body": "hi"},
        headers={"Authorization": _basic(account_sid, AUTH_TOKEN)},
    )
    with pytest.raises(jsonschema.ValidationError):
        assert_valid_create_message(request)


async def test_a_misconfigured_account_sid_fails_without_a_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    with pytest.raises(ProviderError) as caught:
        await send(handler, account_sid="AC123")
    assert caught.value.kind is ErrorKind.PERMANENT
    assert caught.value.code == "config"


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


# --- the response ------------------------------------------------------------------------------


def twilio_error(status: int, code: int, message: str, **headers: str) -> Handler:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return lambda request: httpx.Response(status, json=body, headers=headers)


async def test_invalid_to_is_permanent() -> None:
    message = "The 'To' number +1555 is not a valid phone number."
    error = await send_error(twilio_error(400, 21211, message))
    assert (error.kind, error.code, error.detail) == (ErrorKind.PERMANENT, "21211", message)


async def test_unsubscribed_recipient_is_permanent_and_an_opt_out() -> None:
    message = "Attempt to send to unsubscribed recipient"
    error = await send_error(twilio_error(400, 21610, message))
    assert (error.kind, error.code, error.detail) == (ErrorKind.PERMANENT, "21610", message)
    assert error.recipient_opted_out


@pytest.mark.parametrize("code", [21614, 21408, 21606, 21659, 30007])
async def test_refusals_in_the_table_are_permanent(code: int) -> None:
    error = await send_error(twilio_error(400, code, "refused"))
    assert (error.kind, error.code, error.retry_after) == (ErrorKind.PERMANENT, str(code), None)
    assert not error.recipient_opted_out


async def test_errors_without_a_twilio_code_are_not_opt_outs() -> None:
    error = await send_error(lambda request: httpx.Response(400, text="<html>Bad</html>"))
    assert (error.code, error.recipient_opted_out) == ("http_400", False)
    error = await send_error(twilio_error(503, 20503, "Service unavailable"))
    assert (error.kind, error.recipient_opted_out) == (ErrorKind.RETRYABLE, False)


async def test_an_authentication_error_is_permanent() -> None:
    error = await send_error(twilio_error(401, 20003, "Authenticate"))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "20003")


async def test_an_unknown_4xx_is_permanent() -> None:
    error = await send_error(twilio_error(400, 29999, "Something new"))
    assert (error.kind, error.code, error.detail) == (ErrorKind.PERMANENT, "29999", "Something new")
    error = await send_error(lambda request: httpx.Response(404, text="<html>Not Found</html>"))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "http_404")


async def test_a_full_sender_queue_is_retryable_despite_its_400() -> None:
    error = await send_error(twilio_error(400, 21611, "This 'From' number has exceeded ..."))
    assert (error.kind, error.code) == (ErrorKind.RETRYABLE, "21611")


async def test_too_many_requests_is_retryable_after_retry_after() -> None:
    error = await send_error(twilio_error(429, 20429, "Too Many Requests", **{"Retry-After": "7"}))
    assert (error.kind, error.code, error.retry_after) == (ErrorKind.RETRYABLE, "20429", 7.0)


async def test_retry_after_may_be_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    error = await send_error(lambda request: httpx.Response(429, headers={"Retry-After": when}))
    assert error.kind is ErrorKind.RETRYABLE
    assert error.retry_after is not None and 100 < error.retry_after <= 120


@pytest.mark.parametrize(
    ("status", "code", "expected_code"),
    [
        (500, 20500, "20500"),
        (503, 20503, "20503"),
        (502, None, "http_502"),
        (599, None, "http_599"),
    ],
)
async def test_server_errors_are_retryable(
    status: int, code: int | None, expected_code: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if code is None:
            return httpx.Response(status, text="<html>Bad Gateway</html>")
        return twilio_error(status, code, "Service unavailable")(request)

    error = await send_error(handler)
    assert (error.kind, error.code, error.retry_after) == (ErrorKind.RETRYABLE, expected_code, None)


async def test_service_unavailable_honours_retry_after() -> None:
    error = await send_error(lambda request: httpx.Response(503, headers={"Retry-After": "30"}))
    assert (error.kind, error.retry_after) == (ErrorKind.RETRYABLE, 30.0)


@pytest.mark.parametrize(
    "exception",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("busy")],
)
async def test_failures_before_sending_are_retryable(exception: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    assert (await send_error(handler)).kind is ErrorKind.RETRYABLE


@pytest.mark.parametrize(
    "exception",
    [
        httpx.ReadTimeout("no answer"),
        httpx.WriteTimeout("stalled"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
async def test_failures_after_sending_are_of_unknown_outcome(exception: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    assert (await send_error(handler)).kind is ErrorKind.UNKNOWN_OUTCOME


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(201, text="<html>oops</html>"),
        httpx.Response(201, json=[]),
        httpx.Response(201, json={}),
        httpx.Response(201, json=message_body(sid=None)),
        httpx.Response(201, json=message_body(sid="")),
        httpx.Response(201),
    ],
)
async def test_success_without_a_readable_sid_is_of_unknown_outcome(
    response: httpx.Response,
) -> None:
    error = await send_error(lambda request: response)
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME


async def test_a_redirect_is_of_unknown_outcome() -> None:
    error = await send_error(
        lambda request: httpx.Response(301, headers={"Location": "https://elsewhere.example"})
    )
    assert error.kind is ErrorKind.UNKNOWN_OUTCOME


# --- signatures --------------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Base64 HMAC-SHA1 (key: auth token) of the URL plus each POST name+value, sorted by name."""
    data = url
    for name in sorted(params):
        data += name + params[name]
    mac = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


STATUS_PARAMS = {
    "AccountSid": ACCOUNT_SID,
    "ApiVersion": "2010-04-01",
    "From": "+14155552345",
    "MessageSid": MESSAGE_SID,
    "MessageStatus": "delivered",
    "SmsSid": MESSAGE_SID,
    "SmsStatus": "delivered",
    "To": "+14155550123",
}


def callback(
    params: Mapping[str, str],
    *,
    url: str = CALLBACK_URL,
    method: str = "POST",
    signature: str | None = None,
    signed_url: str | None = None,
    signed_params: Mapping[str, str] | None = None,
) -> CallbackRequest:
    """A callback as the route hands it over, signed over what arrives unless told otherwise."""
    if signature is None:
        signature = twilio_signature(
            AUTH_TOKEN,
            signed_url or url,
            params if signed_params is None else signed_params,
        )
    return CallbackRequest(
        url=url,
        method=method,
        params=dict(params),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": signature,
        },
    )


def test_the_documented_example_signature_verifies() -> None:
    # Twilio's published example: auth token 12345, this URL and these POST fields.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    expected = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_signature("12345", url, params) == expected
    assert compute_signature("12345", url, params) == expected
    request = CallbackRequest(url, "POST", params, {"x-twilio-signature": expected})
    assert make_provider(auth_token="12345").verify_callback(request)
    assert not make_provider().verify_callback(request)  # another account's token


def test_a_valid_signature_passes() -> None:
    assert make_provider().verify_callback(callback(STATUS_PARAMS))


def test_a_signature_over_non_ascii_values_passes() -> None:
    params = {**STATUS_PARAMS, "Body": "Grüße ✓"}
    assert make_provider().verify_callback(callback(params))


def test_an_unknown_parameter_that_was_signed_passes() -> None:
    params = {**STATUS_PARAMS, "RawDlrDoneDate": "2401011200", "ChannelPrefix": "sms"}
    assert make_provider().verify_callback(callback(params))


def test_a_tampered_parameter_fails() -> None:
    tampered = {**STATUS_PARAMS, "MessageStatus": "failed"}
    assert not make_provider().verify_callback(callback(tampered, signed_params=STATUS_PARAMS))


def test_an_added_or_removed_parameter_fails() -> None:
    added = {**STATUS_PARAMS, "ErrorCode": "30003"}
    removed = {k: v for k, v in STATUS_PARAMS.items() if k != "SmsStatus"}
    provider = make_provider()
    assert not provider.verify_callback(callback(added, signed_params=STATUS_PARAMS))
    assert not provider.verify_callback(callback(removed, signed_params=STATUS_PARAMS))


def test_a_tampered_url_fails() -> None:
    other_message = f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id={uuid.uuid4()}"
    request = callback(STATUS_PARAMS, url=other_message, signed_url=CALLBACK_URL)
    assert not make_provider().verify_callback(request)


def test_a_missing_or_empty_signature_fails() -> None:
    signed = callback(STATUS_PARAMS)
    unsigned = CallbackRequest(signed.url, signed.method, signed.params, {})
    provider = make_provider()
    assert not provider.verify_callback(unsigned)
    assert not provider.verify_callback(callback(STATUS_PARAMS, signature=""))
    assert not provider.verify_callback(callback(STATUS_PARAMS, signature="not base64 at all"))


def test_an_empty_auth_token_verifies_nothing() -> None:
    # Even a signature made with the empty key: an unconfigured token must not accept anything.
    signature = twilio_signature("", CALLBACK_URL, STATUS_PARAMS)
    request = callback(STATUS_PARAMS, signature=signature)
    assert not make_provider(auth_token="").verify_callback(request)


def test_a_get_callback_signs_the_url_only() -> None:
    url = f"{CALLBACK_URL}&MessageSid={MESSAGE_SID}&MessageStatus=sent"
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    signature = twilio_signature(AUTH_TOKEN, url, {})
    provider = make_provider()
    assert provider.verify_callback(callback(query, url=url, method="GET", signature=signature))
    doubled = twilio_signature(AUTH_TOKEN, url, query)
    assert not provider.verify_callback(callback(query, url=url, method="GET", signature=doubled))


def test_a_signature_made_without_the_https_port_passes() -> None:
    with_port = CALLBACK_URL.replace("sms.example.com", "sms.example.com:443")
    request = callback(STATUS_PARAMS, url=with_port, signed_url=CALLBACK_URL)
    assert make_provider().verify_callback(request)


def test_a_signature_made_with_the_default_port_passes() -> None:
    with_port = CALLBACK_URL.replace("sms.example.com", "sms.example.com:443")
    request = callback(STATUS_PARAMS, url=CALLBACK_URL, signed_url=with_port)
    assert make_provider().verify_callback(request)


def test_a_signature_for_another_port_fails() -> None:
    other_port = CALLBACK_URL.replace("sms.example.com", "sms.example.com:8443")
    request = callback(STATUS_PARAMS, url=CALLBACK_URL, signed_url=other_port)
    assert not make_provider().verify_callback(request)


# --- status callbacks --------------------------------------------------------------------------

# Written out here rather than read from the adapter, so a changed mapping fails a test.
EXPECTED_STATUSES: dict[str, MessageStatus | None] = {
    "accepted": MessageStatus.SENT,
    "scheduled": MessageStatus.SENT,
    "queued": MessageStatus.SENT,
    "sending": MessageStatus.SENT,
    "sent": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "partially_delivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
    "canceled": MessageStatus.CANCELED,
    "receiving": None,
    "received": None,
}


def test_every_status_in_the_spec_is_mapped() -> None:
    assert set(EXPECTED_STATUSES) == set(SPEC["response_schema"]["properties"]["status"]["enum"])


@pytest.mark.parametrize(("twilio_status", "expected"), list(EXPECTED_STATUSES.items()))
def test_status_mapping(twilio_status: str, expected: MessageStatus | None) -> None:
    params = {**STATUS_PARAMS, "MessageStatus": twilio_status, "SmsStatus": twilio_status}
    report = make_provider().parse_status_callback(callback(params))
    assert report.status == expected
    assert report.provider_status == twilio_status
    assert report.provider_message_id == MESSAGE_SID
    assert report.message_id == MESSAGE_ID
    assert report.raw == params


def test_an_undocumented_status_is_recorded_without_a_status() -> None:
    params = {**STATUS_PARAMS, "MessageStatus": "teleported"}
    report = make_provider().parse_status_callback(callback(params))
    assert (report.provider_status, report.status) == ("teleported", None)


def test_a_failure_carries_its_error_code_and_message() -> None:
    params = {
        **STATUS_PARAMS,
        "MessageStatus": "undelivered",
        "ErrorCode": "30003",
        "ErrorMessage": "Unreachable destination handset",
    }
    report = make_provider().parse_status_callback(callback(params))
    assert report.status is MessageStatus.UNDELIVERED
    assert (report.error_code, report.error_message) == ("30003", "Unreachable destination handset")


def test_an_empty_error_code_is_no_error() -> None:
    params = {**STATUS_PARAMS, "ErrorCode": "", "ErrorMessage": ""}
    report = make_provider().parse_status_callback(callback(params))
    assert (report.error_code, report.error_message) == (None, None)
    assert not report.recipient_opted_out


def test_an_unsubscribed_recipient_in_a_status_callback_is_an_opt_out() -> None:
    # A Messaging Service accepts the message first and reports 21610 in the callback.
    params = {
        **STATUS_PARAMS,
        "MessageStatus": "failed",
        "SmsStatus": "failed",
        "ErrorCode": "21610",
        "MessagingServiceSid": "MG" + "0123456789abcdef" * 2,
    }
    request = callback(params)
    provider = make_provider()
    assert provider.verify_callback(request)
    report = provider.parse_status_callback(request)
    assert (report.status, report.error_code) == (MessageStatus.FAILED, "21610")
    assert report.recipient_opted_out


@pytest.mark.parametrize("error_code", ["30003", "30007", "21611", "216100", "2161O", "²¹⁶¹⁰"])
def test_other_error_codes_in_a_status_callback_are_not_opt_outs(error_code: str) -> None:
    params = {**STATUS_PARAMS, "MessageStatus": "undelivered", "ErrorCode": error_code}
    report = make_provider().parse_status_callback(callback(params))
    assert report.error_code == error_code
    assert not report.recipient_opted_out


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (CALLBACK_URL, MESSAGE_ID),
        (f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id={MESSAGE_ID.hex}", MESSAGE_ID),
        (f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id=not-a-uuid", None),
        (f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status?message_id=", None),
        (f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/status", None),
    ],
)
def test_message_id_comes_from_the_url(url: str, expected: uuid.UUID | None) -> None:
    report = make_provider().parse_status_callback(callback(STATUS_PARAMS, url=url))
    assert report.message_id == expected


@pytest.mark.parametrize("missing", ["MessageSid", "MessageStatus"])
def test_a_callback_without_sid_or_status_is_invalid(missing: str) -> None:
    provider = make_provider()
    absent = {k: v for k, v in STATUS_PARAMS.items() if k != missing}
    with pytest.raises(InvalidCallback):
        provider.parse_status_callback(callback(absent))
    with pytest.raises(InvalidCallback):
        provider.parse_status_callback(callback({**STATUS_PARAMS, missing: ""}))


# --- incoming messages -------------------------------------------------------------------------

INBOUND_URL = f"{PUBLIC_BASE_URL}/v1/webhooks/twilio/inbound"
INBOUND_SID = "SM" + "0f9e8d7c6b5a49382716a5b4c3d2e1f0"
MESSAGING_SERVICE_SID = "MG" + "fedcba9876543210" * 2

# Every field Twilio's "request to your incoming message Webhook URL" lists for an SMS, with the
# geographic ones it adds when it can, and the legacy Sms* names it still sends.
INBOUND_PARAMS = {
    "ToCountry": "US",
    "ToState": "CA",
    "SmsMessageSid": INBOUND_SID,
    "NumMedia": "0",
    "ToCity": "SAN FRANCISCO",
    "FromZip": "94105",
    "SmsSid": INBOUND_SID,
    "FromState": "CA",
    "SmsStatus": "received",
    "FromCity": "SAN FRANCISCO",
    "Body": "STOP",
    "FromCountry": "US",
    "To": "+14155552345",
    "MessagingServiceSid": MESSAGING_SERVICE_SID,
    "ToZip": "94105",
    "NumSegments": "1",
    "MessageSid": INBOUND_SID,
    "AccountSid": ACCOUNT_SID,
    "From": "+14155550123",
    "ApiVersion": "2010-04-01",
}


def test_a_documented_incoming_message_is_parsed() -> None:
    inbound = make_provider().parse_inbound(callback(INBOUND_PARAMS, url=INBOUND_URL))
    assert inbound == InboundSms(
        provider_message_id=INBOUND_SID,
        from_="+14155550123",
        to="+14155552345",
        body="STOP",
        num_segments=1,
        part=None,
        raw=INBOUND_PARAMS,
    )


def test_a_signed_incoming_message_verifies_at_the_inbound_url() -> None:
    # Parameters Twilio may add without notice are signed like the rest and kept in `raw`.
    params = {
        **INBOUND_PARAMS,
        "Body": "Grüße & more = ✓",
        "NumSegments": "2",
        "ReferralNumMedia": "0",
        "AddOns": '{"status":"successful","message":null,"code":null,"results":{}}',
    }
    request = callback(params, url=INBOUND_URL)
    provider = make_provider()

    assert provider.verify_callback(request)
    inbound = provider.parse_inbound(request)
    assert (inbound.body, inbound.num_segments) == ("Grüße & more = ✓", 2)
    assert inbound.raw == params

    # Signed for the status URL, or over other parameters: refused at the inbound URL.
    assert not provider.verify_callback(callback(params, url=INBOUND_URL, signed_url=CALLBACK_URL))
    tampered = {**params, "From": "+14155550199"}
    assert not provider.verify_callback(callback(tampered, url=INBOUND_URL, signed_params=params))


def test_an_incoming_message_without_a_body_has_an_empty_one() -> None:
    # Twilio sends no Body for a GET webhook, and an MMS may come with pictures only.
    params = {k: v for k, v in INBOUND_PARAMS.items() if k != "Body"}
    inbound = make_provider().parse_inbound(callback(params, url=INBOUND_URL))
    assert inbound.body == ""


@pytest.mark.parametrize(
    ("num_segments", "expected"),
    [(None, None), ("", None), ("3", 3), ("0", None), ("three", None), ("-1", None), ("²", None)],
)
def test_num_segments_is_read_only_when_it_is_a_count(
    num_segments: str | None, expected: int | None
) -> None:
    params = {k: v for k, v in INBOUND_PARAMS.items() if k != "NumSegments"}
    if num_segments is not None:
        params["NumSegments"] = num_segments
    inbound = make_provider().parse_inbound(callback(params, url=INBOUND_URL))
    assert inbound.num_segments == expected


@pytest.mark.parametrize("missing", ["MessageSid", "From", "To"])
def test_an_incoming_message_without_sid_from_or_to_is_invalid(missing: str) -> None:
    provider = make_provider()
    absent = {k: v for k, v in INBOUND_PARAMS.items() if k != missing}
    with pytest.raises(InvalidCallback):
        provider.parse_inbound(callback(absent, url=INBOUND_URL))
    with pytest.raises(InvalidCallback):
        provider.parse_inbound(callback({**INBOUND_PARAMS, missing: ""}, url=INBOUND_URL))
