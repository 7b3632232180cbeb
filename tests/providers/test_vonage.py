"""The Vonage adapter against `httpx.MockTransport`: request shape, outcomes, signatures, DLRs.

Every request the adapter makes here is checked against the send-an-sms operation extracted from
Vonage's API description (`tests/fixtures/vonage_send_sms.json`; see `vonage_spec.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import parse_qs

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
    InboundPart,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    ProviderError,
)
from app.providers.vonage import SEND_STATUS_KINDS, SEND_STATUS_TEXT, VonageProvider, VonageSettings
from tests.providers.vonage_spec import SPEC, assert_valid_send_sms

Handler = Callable[[httpx.Request], httpx.Response]
Method = Literal["md5hash", "md5", "sha1", "sha256", "sha512"]

MESSAGE_ID = uuid.UUID("6f1c2a4e-8d0b-4c1a-9a57-3f0e2b1d7c55")
SEND_URL = "https://rest.nexmo.com/sms/json"
PUBLIC_BASE_URL = "https://sms.example.com"

# The success response exactly as Vonage documents it ("Troubleshooting SMS").
DOCUMENTED_SUCCESS: dict[str, Any] = {
    "message-count": "1",
    "messages": [
        {
            "to": "447700900000",
            "message-id": "0C000000217B7F02",
            "status": "0",
            "remaining-balance": "15.53590000",
            "message-price": "0.03330000",
            "network": "23410",
        }
    ],
}

# The delivery receipt exactly as Vonage documents it ("Delivery receipts").
DOCUMENTED_DLR: dict[str, str] = {
    "err-code": "0",
    "message-timestamp": "2018-10-25 12:10:29",
    "messageId": "0B00000127FDBC63",
    "msisdn": "447547232824",
    "network-code": "23410",
    "price": "0.03330000",
    "scts": "1810251310",
    "status": "delivered",
    "to": "Nexmo CLI",
}


def make_settings(
    method: Method = "md5hash", secret: str = "my_secret_key_for_testing"
) -> VonageSettings:
    return VonageSettings(
        api_key="abcd1234",
        api_secret=SecretStr("abcdef0123456789"),
        signature_secret=SecretStr(secret),
        signature_method=method,
        base_url="https://rest.nexmo.com",
        signature_max_age_seconds=300,
    )


def make_sms(**overrides: Any) -> OutboundSms:
    fields: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "to": "+447700900000",
        "sender": "+14155550100",
        "body": "Your code is 123456",
        "encoding": Encoding.GSM7,
    }
    fields.update(overrides)
    return OutboundSms(**fields)


def json_response(body: Mapping[str, Any], status_code: int = 200) -> Handler:
    return lambda request: httpx.Response(status_code, json=body)


async def send(
    sms: OutboundSms, handler: Handler, settings: VonageSettings | None = None
) -> tuple[Accepted, list[httpx.Request]]:
    """Send through a provider whose HTTP client only talks to `handler`."""
    seen: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert_valid_send_sms(request)  # every request of every test here
        return handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(recording)) as http:
        provider = VonageProvider(settings or make_settings(), http, PUBLIC_BASE_URL)
        accepted = await provider.send(sms)
    return accepted, seen


async def send_error(handler: Handler, sms: OutboundSms | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await send(sms or make_sms(), handler)
    return caught.value


def form_of(request: httpx.Request) -> dict[str, str]:
    parsed = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    assert all(len(values) == 1 for values in parsed.values()), parsed
    return {key: values[0] for key, values in parsed.items()}


# --- the spec ----------------------------------------------------------------------------------


def test_the_fixture_names_its_source() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", SPEC["source"]["commit"])
    assert SPEC["source"]["file"] == "definitions/sms.yml"
    assert SPEC["operation_id"] == "send-an-sms"


def test_every_documented_send_status_is_classified_with_its_meaning() -> None:
    documented = SPEC["send_statuses"]

    assert set(SEND_STATUS_KINDS) == set(documented) == set(SEND_STATUS_TEXT)
    for status, description in documented.items():
        assert description.startswith(SEND_STATUS_TEXT[status] + "."), status


def test_the_documented_success_response_is_valid_against_the_spec() -> None:
    jsonschema.validate(DOCUMENTED_SUCCESS, SPEC["success_schema"])
    jsonschema.validate(DOCUMENTED_DLR, SPEC["delivery_receipt_schema"])


def spec_request(**changes: str | None) -> httpx.Request:
    """A send request as the adapter makes it, with fields changed or (None) removed."""
    form: dict[str, str] = {
        "api_key": "abcd1234",
        "api_secret": "abcdef0123456789",
        "from": "ACME",
        "to": "447700900000",
        "text": "hi",
        "type": "text",
        "status-report-req": "true",
        "callback": "https://sms.example.com/v1/webhooks/vonage/status",
        "client-ref": str(MESSAGE_ID),
    }
    for key, value in changes.items():
        if value is None:
            form.pop(key, None)
        else:
            form[key] = value
    return httpx.Request("POST", SEND_URL, data=form)


def test_the_validator_accepts_the_adapters_shape() -> None:
    assert assert_valid_send_sms(spec_request(ttl="20000"))["ttl"] == 20000


@pytest.mark.parametrize(
    "changes",
    [
        {"status-report-req": "1"},  # typed boolean: what the adapter used to send
        {"ttl": "19999"},  # below the documented range
        {"ttl": "604800001"},
        {"ttl": "20s"},
        {"type": "ucs2"},
        {"api_key": "vonage-key"},  # exactly 8 characters
        {"api_secret": "abc"},
        {"to": "+447700900000"},
        {"to": "123456"},
        {"client-ref": "x" * 41},
        {"from": None},  # required
        {"statusreportreq": "true"},  # unknown: Vonage would ignore it silently
        {"api_secret": None},
    ],
)
def test_the_validator_refuses_what_the_spec_refuses(changes: dict[str, str | None]) -> None:
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        assert_valid_send_sms(spec_request(**changes))


# --- send: request shape -----------------------------------------------------------------------


async def test_request_carries_every_documented_field() -> None:
    _, seen = await send(make_sms(), json_response(DOCUMENTED_SUCCESS))

    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == SEND_URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form_of(request) == {
        "api_key": "abcd1234",
        "api_secret": "abcdef0123456789",
        "from": "14155550100",
        "to": "447700900000",
        "text": "Your code is 123456",
        "type": "text",
        "status-report-req": "true",
        "callback": "https://sms.example.com/v1/webhooks/vonage/status",
        "client-ref": str(MESSAGE_ID),
    }


async def test_ucs2_is_sent_as_unicode() -> None:
    sms = make_sms(body="Ваш код 123456 ✓", encoding=Encoding.UCS2)
    _, [request] = await send(sms, json_response(DOCUMENTED_SUCCESS))

    form = form_of(request)
    assert form["type"] == "unicode"
    assert form["text"] == "Ваш код 123456 ✓"


async def test_alphanumeric_sender_is_passed_unchanged() -> None:
    _, [request] = await send(make_sms(sender="AcmeInc"), json_response(DOCUMENTED_SUCCESS))

    assert form_of(request)["from"] == "AcmeInc"


async def test_short_code_sender_is_passed_unchanged() -> None:
    _, [request] = await send(make_sms(sender="12345"), json_response(DOCUMENTED_SUCCESS))

    assert form_of(request)["from"] == "12345"


async def test_text_with_form_metacharacters_survives_encoding() -> None:
    body = "a&b=c+d 100% #1"
    _, [request] = await send(make_sms(body=body), json_response(DOCUMENTED_SUCCESS))

    assert form_of(request)["text"] == body


@pytest.mark.parametrize(
    ("validity_seconds", "ttl"),
    [
        (3600, "3600000"),  # in range: seconds -> milliseconds
        (20, "20000"),  # the documented minimum
        (5, "20000"),  # below the minimum: clamped up
        (0, "20000"),
        (7 * 24 * 3600, "604800000"),  # the documented maximum
        (30 * 24 * 3600, "604800000"),  # above the maximum: clamped down
    ],
)
async def test_ttl_is_milliseconds_clamped_to_documented_range(
    validity_seconds: int, ttl: str
) -> None:
    sms = make_sms(validity_seconds=validity_seconds)
    _, [request] = await send(sms, json_response(DOCUMENTED_SUCCESS))

    assert form_of(request)["ttl"] == ttl


async def test_no_ttl_without_validity() -> None:
    _, [request] = await send(make_sms(validity_seconds=None), json_response(DOCUMENTED_SUCCESS))

    assert "ttl" not in form_of(request)


async def test_base_url_trailing_slash_is_tolerated() -> None:
    settings = make_settings().model_copy(update={"base_url": "http://127.0.0.1:9/"})
    _, [request] = await send(make_sms(), json_response(DOCUMENTED_SUCCESS), settings)

    assert str(request.url) == "http://127.0.0.1:9/sms/json"


# --- send: success -----------------------------------------------------------------------------


async def test_documented_success_response_is_accepted() -> None:
    accepted, _ = await send(make_sms(), json_response(DOCUMENTED_SUCCESS))

    assert accepted == Accepted(provider_message_id="0C000000217B7F02")


async def test_multipart_success_returns_every_part_id_in_order() -> None:
    body = {
        "message-count": "3",
        "messages": [
            {"to": "447700900000", "message-id": f"0C00000021{n}", "status": "0"}
            for n in ("7B7F02", "7B7F03", "7B7F04")
        ],
    }
    jsonschema.validate(body, SPEC["success_schema"])
    accepted, _ = await send(make_sms(), json_response(body))

    assert accepted.provider_message_id == "0C000000217B7F02"
    assert accepted.part_ids == ("0C000000217B7F02", "0C000000217B7F03", "0C000000217B7F04")


async def test_a_one_part_message_has_no_part_ids() -> None:
    accepted, _ = await send(make_sms(), json_response(DOCUMENTED_SUCCESS))

    assert accepted.part_ids == ()


# --- send: failures ----------------------------------------------------------------------------


def failure(status: str, text: str) -> dict[str, Any]:
    body = {"message-count": "1", "messages": [{"status": status, "error-text": text}]}
    jsonschema.validate(body, SPEC["error_schema"])  # shaped as Vonage documents its errors
    return body


async def test_throttled_is_retryable() -> None:
    error = await send_error(json_response(failure("1", "Throughput Rate Exceeded")))

    assert error.kind is ErrorKind.RETRYABLE
    assert error.code == "1"
    assert "Throughput Rate Exceeded" in error.detail


async def test_invalid_credentials_is_permanent() -> None:
    error = await send_error(json_response(failure("4", "Bad Credentials")))

    assert error.kind is ErrorKind.PERMANENT
    assert error.code == "4"
    assert "Bad Credentials" in error.detail


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("2", ErrorKind.PERMANENT),
        ("3", ErrorKind.PERMANENT),
        ("5", ErrorKind.RETRYABLE),
        ("6", ErrorKind.PERMANENT),
        ("7", ErrorKind.PERMANENT),
        ("8", ErrorKind.PERMANENT),
        ("9", ErrorKind.PERMANENT),
        ("10", ErrorKind.RETRYABLE),
        ("11", ErrorKind.PERMANENT),
        ("12", ErrorKind.PERMANENT),
        ("14", ErrorKind.PERMANENT),
        ("15", ErrorKind.PERMANENT),
        ("22", ErrorKind.PERMANENT),
        ("23", ErrorKind.PERMANENT),
        ("29", ErrorKind.PERMANENT),
        ("32", ErrorKind.PERMANENT),
        ("33", ErrorKind.PERMANENT),
        ("99", ErrorKind.PERMANENT),  # undocumented: not accepted, so fail rather than retry
    ],
)
async def test_send_status_table(status: str, kind: ErrorKind) -> None:
    error = await send_error(json_response(failure(status, "whatever Vonage says")))

    assert (error.kind, error.code) == (kind, status)


async def test_missing_error_text_falls_back_to_documented_meaning() -> None:
    body = {"message-count": "1", "messages": [{"status": "7"}]}
    error = await send_error(json_response(body))

    assert "Number Barred" in error.detail


async def test_partial_success_is_permanent_and_says_so() -> None:
    body = {
        "message-count": "2",
        "messages": [
            {"to": "447700900000", "message-id": "0C000000217B7F02", "status": "0"},
            {"status": "1", "error-text": "Throughput Rate Exceeded"},
        ],
    }
    error = await send_error(json_response(body))

    # Even though throttling alone would be retryable, part 1 is already on its way.
    assert error.kind is ErrorKind.PERMANENT
    assert error.code == "partially_sent"
    assert not error.throttled
    assert error.detail == (
        "partially sent: 1 of 2 parts accepted; "
        "part 2 refused with status 1: Throughput Rate Exceeded"
    )


async def test_partial_success_names_the_first_refused_part() -> None:
    body = {
        "message-count": "3",
        "messages": [
            {"to": "447700900000", "message-id": "0C000000217B7F02", "status": "0"},
            {"status": "5"},
            {"status": "1"},
        ],
    }
    error = await send_error(json_response(body))

    assert error.code == "partially_sent"
    assert "1 of 3 parts accepted; part 2 refused with status 5: Internal Error" in error.detail


async def test_http_500_is_retryable() -> None:
    error = await send_error(lambda request: httpx.Response(500, text="oops"))

    assert error.kind is ErrorKind.RETRYABLE
    assert error.code == "http_500"


async def test_http_429_is_retryable_with_retry_after() -> None:
    error = await send_error(lambda request: httpx.Response(429, headers={"Retry-After": "7"}))

    assert error.kind is ErrorKind.RETRYABLE
    assert error.retry_after == 7.0


async def test_other_http_error_is_permanent() -> None:
    error = await send_error(lambda request: httpx.Response(401, text="Unauthorized"))

    assert error.kind is ErrorKind.PERMANENT
    assert error.code == "http_401"


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_failure_before_sending_is_retryable(exc_type: type[httpx.TransportError]) -> None:
    error = await send_error(raising(exc_type))

    assert error.kind is ErrorKind.RETRYABLE


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.RemoteProtocolError],
)
async def test_failure_after_sending_is_unknown_outcome(
    exc_type: type[httpx.TransportError],
) -> None:
    error = await send_error(raising(exc_type))

    assert error.kind is ErrorKind.UNKNOWN_OUTCOME


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"",
        b"[]",
        b'{"message-count": "0", "messages": []}',
        b'{"messages": ["0"]}',
        b'{"messages": [{"message-id": "0C000000217B7F02"}]}',
        b'{"messages": [{"status": "0"}]}',  # accepted, but nothing to track it by
    ],
)
async def test_unreadable_200_is_unknown_outcome(body: bytes) -> None:
    error = await send_error(lambda request: httpx.Response(200, content=body))

    assert error.kind is ErrorKind.UNKNOWN_OUTCOME


# --- signatures --------------------------------------------------------------------------------


NOW = 1_700_000_000.0


def make_provider(settings: VonageSettings, now: float = NOW) -> VonageProvider:
    # The HTTP client is never used by callback methods; a transport that fails loudly proves it.
    def no_network(request: httpx.Request) -> httpx.Response:
        raise AssertionError("callbacks must not make HTTP calls")

    http = httpx.AsyncClient(transport=httpx.MockTransport(no_network))
    return VonageProvider(settings, http, PUBLIC_BASE_URL, clock=lambda: now)


def callback(params: Mapping[str, str]) -> CallbackRequest:
    return CallbackRequest(
        url="https://sms.example.com/v1/webhooks/vonage/status",
        method="POST",
        params=dict(params),
        headers={"content-type": "application/json"},
    )


def documented_sig(params: Mapping[str, str], secret: str, method: Method) -> str:
    """Written from Vonage's "Manually generate a signature" steps, independently of the adapter.

    1. drop `sig`; 2. walk the parameters sorted by key; 3. in every value replace each `&` and
    `=` with `_`; 4. build `&akey=value&bkey=value` (leading `&`); then either MD5 of the string
    followed by the secret ("md5hash") or an HMAC of the string keyed with the secret.
    """
    pieces = []
    for key in sorted(k for k in params if k != "sig"):
        value = params[key]
        for char in ("&", "="):
            value = value.replace(char, "_")
        pieces.append("&" + key + "=" + value)
    data = "".join(pieces).encode("utf-8")
    if method == "md5hash":
        return hashlib.md5(data + secret.encode("utf-8")).hexdigest()
    # HMAC signatures arrive in upper-case hex (see the DLR `sig` example in Vonage's API spec).
    return hmac.new(secret.encode("utf-8"), data, method).hexdigest().upper()


# Inbound-SMS webhooks and their signatures from Vonage's own PHP SDK test suite
# (Vonage/vonage-php-sdk-core, test/Client/SignatureTest.php); secret "my_secret_key_for_testing".
VONAGE_INBOUND = {
    "message-timestamp": "2013-11-21 15:27:30",
    "messageId": "020000001B0FE827",
    "msisdn": "14843472194",
    "text": "Test again",
    "timestamp": "1385047698",
    "to": "13239877404",
    "type": "text",
}
VONAGE_INBOUND_SIGS: dict[Method, str] = {
    "md5hash": "d2e7b1dc968737c5998ad624e02f90b7",
    "md5": "DDEBD46008C2D4E93CCE578A332A52D5",
    "sha1": "27D0D05C2876C7CB1720DBCDBA4D492E1E55C09A",
    "sha256": "DDB8397C2B90AAC7F3882D306475C9A5058C92322EEF43C92B298B6E0FC0D330",
    "sha512": (
        "E0D3C650F8C9D1A5C174D10DDDBFB003E561F59B265616208B0487C5D819481C"
        "D3C311D59CF6165ECD1139622D5BA3A256C0D763AC4A9AD9144B5A426B94FE82"
    ),
}
# A real inbound message whose text contains '&' and '=', with its nonce, from the same suite.
VONAGE_INBOUND_AMP_EQ = {
    "keyword": "TEST",
    "message-timestamp": "2017-04-04 22:57:47",
    "messageId": "0B00000042AC53BD",
    "msisdn": "14843472194",
    "nonce": "929d6744-bd28-42c8-b6cf-31d5b4f43732",
    "sig": "e06d9763e3fd0b9c31beb5fc2fcb011c",
    "text": "Test with & and =",
    "timestamp": "1491346667",
    "to": "12192259404",
    "type": "text",
}


@pytest.mark.parametrize("method", sorted(VONAGE_INBOUND_SIGS))
def test_vonage_published_vectors_verify(method: Method) -> None:
    params = {**VONAGE_INBOUND, "sig": VONAGE_INBOUND_SIGS[method]}
    provider = make_provider(make_settings(method), now=1385047698 + 5)

    expected = VONAGE_INBOUND_SIGS[method]
    assert documented_sig(VONAGE_INBOUND, "my_secret_key_for_testing", method) == expected
    assert provider.verify_callback(callback(params))


def test_vonage_published_vector_with_ampersand_and_equals() -> None:
    provider = make_provider(make_settings("md5hash"), now=1491346667)

    assert provider.verify_callback(callback(VONAGE_INBOUND_AMP_EQ))


def test_ampersand_and_equals_are_not_signed_raw() -> None:
    # Had the adapter signed the raw values, this signature (over the raw text) would verify.
    params = dict(VONAGE_INBOUND_AMP_EQ)
    raw_base = "".join(f"&{k}={params[k]}" for k in sorted(params) if k != "sig")
    params["sig"] = hashlib.md5((raw_base + "my_secret_key_for_testing").encode()).hexdigest()
    provider = make_provider(make_settings("md5hash"), now=1491346667)

    assert not provider.verify_callback(callback(params))


def signed_dlr(method: Method, secret: str = "s3cr3t", **extra: str) -> dict[str, str]:
    params = {
        **DOCUMENTED_DLR,
        "client-ref": str(MESSAGE_ID),
        "api-key": "abcd1234",
        "timestamp": str(int(NOW)),
        "nonce": "ec11dd3e-1e7f-4db5-9467-82b02cd223b9",
        **extra,
    }
    params["sig"] = documented_sig(params, secret, method)
    return params


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
def test_signed_dlr_verifies(method: Method) -> None:
    provider = make_provider(make_settings(method, secret="s3cr3t"))

    assert provider.verify_callback(callback(signed_dlr(method)))


@pytest.mark.parametrize("method", ["md5hash", "sha256"])
def test_signature_hex_case_is_ignored(method: Method) -> None:
    provider = make_provider(make_settings(method, secret="s3cr3t"))
    params = signed_dlr(method)

    assert provider.verify_callback(callback({**params, "sig": params["sig"].upper()}))
    assert provider.verify_callback(callback({**params, "sig": params["sig"].lower()}))


@pytest.mark.parametrize("method", ["md5hash", "sha256"])
def test_values_with_ampersand_and_equals(method: Method) -> None:
    provider = make_provider(make_settings(method, secret="s3cr3t"))
    params = signed_dlr(method, **{"client-ref": "a=b&c=d", "to": "Acme & Co"})

    assert provider.verify_callback(callback(params))
    # '&' and '=' both become '_', so these differ from the signed values only where '_' stands.
    assert provider.verify_callback(callback({**params, "client-ref": "a_b_c_d"}))
    assert not provider.verify_callback(callback({**params, "client-ref": "a=b&c=e"}))


@pytest.mark.parametrize("method", ["md5hash", "sha256"])
@pytest.mark.parametrize(
    ("key", "value"),
    [("status", "failed"), ("messageId", "0B00000127FDBC64"), ("client-ref", str(uuid.uuid4()))],
)
def test_tampered_value_fails(method: Method, key: str, value: str) -> None:
    provider = make_provider(make_settings(method, secret="s3cr3t"))
    params = signed_dlr(method)

    assert not provider.verify_callback(callback({**params, key: value}))


def test_added_parameter_fails() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))

    params = {**signed_dlr("sha256"), "extra": "1"}
    assert not provider.verify_callback(callback(params))


def test_wrong_secret_fails() -> None:
    provider = make_provider(make_settings("sha256", secret="another"))

    assert not provider.verify_callback(callback(signed_dlr("sha256")))


def test_other_method_fails() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))

    assert not provider.verify_callback(callback(signed_dlr("sha512")))


@pytest.mark.parametrize("sig", [None, ""])
def test_missing_sig_fails(sig: str | None) -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    params = signed_dlr("sha256")
    del params["sig"]
    if sig is not None:
        params["sig"] = sig

    assert not provider.verify_callback(callback(params))


def test_empty_secret_refuses_everything() -> None:
    provider = make_provider(make_settings("md5hash", secret=""))
    # A signature an attacker can compute when the secret is empty.
    params = signed_dlr("md5hash", secret="")

    assert not provider.verify_callback(callback(params))


@pytest.mark.parametrize("offset", [301, 3600, -301])
def test_stale_or_future_timestamp_fails(offset: int) -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"), now=NOW + offset)

    assert not provider.verify_callback(callback(signed_dlr("sha256")))


@pytest.mark.parametrize("offset", [0, 300, -300])
def test_timestamp_within_max_age_passes(offset: int) -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"), now=NOW + offset)

    assert provider.verify_callback(callback(signed_dlr("sha256")))


@pytest.mark.parametrize("timestamp", [None, "", "yesterday", "1.7e9"])
def test_missing_or_malformed_timestamp_fails(timestamp: str | None) -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    params = {k: v for k, v in signed_dlr("sha256").items() if k != "timestamp"}
    if timestamp is not None:
        params["timestamp"] = timestamp
    params["sig"] = documented_sig(params, "s3cr3t", "sha256")

    assert not provider.verify_callback(callback(params))


def test_non_ascii_sig_fails_without_error() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))

    assert not provider.verify_callback(callback({**signed_dlr("sha256"), "sig": "é" * 64}))


# --- delivery receipts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dlr_status", "expected"),
    [
        ("delivered", MessageStatus.DELIVERED),
        ("expired", MessageStatus.EXPIRED),
        ("failed", MessageStatus.FAILED),
        ("rejected", MessageStatus.REJECTED),
        ("accepted", MessageStatus.SENT),
        ("buffered", MessageStatus.SENT),
        ("unknown", None),
        ("something-new", None),  # undocumented: recorded, moves nothing
    ],
)
def test_dlr_status_mapping(dlr_status: str, expected: MessageStatus | None) -> None:
    provider = make_provider(make_settings())
    report = provider.parse_status_callback(callback({**DOCUMENTED_DLR, "status": dlr_status}))

    assert report.provider_status == dlr_status
    assert report.status == expected


def test_documented_dlr_is_parsed() -> None:
    provider = make_provider(make_settings())
    params = {**DOCUMENTED_DLR, "client-ref": str(MESSAGE_ID)}
    jsonschema.validate(params, SPEC["delivery_receipt_schema"])

    report = provider.parse_status_callback(callback(params))

    assert report.per_part  # one receipt per part: a long message settles from all of them

    assert report.provider_message_id == "0B00000127FDBC63"
    assert report.status is MessageStatus.DELIVERED
    assert report.message_id == MESSAGE_ID
    assert report.error_code is None  # err-code "0" is success
    assert report.error_message is None
    assert not report.recipient_opted_out
    assert report.raw == params


@pytest.mark.parametrize(
    ("err_code", "meaning"),
    [
        ("1", "Unknown"),
        ("2", "Absent Subscriber - Temporary"),
        ("3", "Absent Subscriber - Permanent"),
        ("4", "Call Barred by User"),
        ("5", "Portability Error"),
        ("6", "Anti-Spam Rejection"),
        ("7", "Handset Busy"),
        ("8", "Network Error"),
        ("9", "Illegal Number"),
        ("10", "Illegal Message"),
        ("11", "Unroutable"),
        ("12", "Destination Unreachable"),
        ("13", "Subscriber Age Restriction"),
        ("14", "Number Blocked by Carrier"),
        ("15", "Prepaid Insufficient Funds"),
        ("99", "General Error"),
    ],
)
def test_dlr_error_codes(err_code: str, meaning: str) -> None:
    provider = make_provider(make_settings())
    params = {**DOCUMENTED_DLR, "status": "failed", "err-code": err_code}

    report = provider.parse_status_callback(callback(params))

    assert report.error_code == err_code
    assert report.error_message is not None
    assert report.error_message.startswith(meaning)


def test_undocumented_err_code_is_kept_without_meaning() -> None:
    provider = make_provider(make_settings())
    params = {**DOCUMENTED_DLR, "status": "failed", "err-code": "42"}

    report = provider.parse_status_callback(callback(params))

    assert (report.error_code, report.error_message) == ("42", None)


@pytest.mark.parametrize("client_ref", [None, "", "my-personal-reference", "1234"])
def test_client_ref_that_is_not_our_uuid(client_ref: str | None) -> None:
    provider = make_provider(make_settings())
    params = dict(DOCUMENTED_DLR)
    if client_ref is not None:
        params["client-ref"] = client_ref

    assert provider.parse_status_callback(callback(params)).message_id is None


def test_signed_dlr_parses_after_verification() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    request = callback(signed_dlr("sha256"))

    assert provider.verify_callback(request)
    report = provider.parse_status_callback(request)
    assert (report.status, report.message_id) == (MessageStatus.DELIVERED, MESSAGE_ID)


@pytest.mark.parametrize("missing", ["messageId", "status"])
@pytest.mark.parametrize("empty", [False, True])
def test_dlr_without_id_or_status_is_invalid(missing: str, empty: bool) -> None:
    provider = make_provider(make_settings())
    params = {k: v for k, v in DOCUMENTED_DLR.items() if k != missing}
    if empty:
        params[missing] = ""

    with pytest.raises(InvalidCallback):
        provider.parse_status_callback(callback(params))


def test_illegal_number_err_code_is_an_opt_out() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    request = callback(signed_dlr("sha256", status="failed", **{"err-code": "9"}))

    assert provider.verify_callback(request)
    report = provider.parse_status_callback(request)
    assert (report.status, report.error_code) == (MessageStatus.FAILED, "9")
    assert report.recipient_opted_out


@pytest.mark.parametrize("err_code", ["0", "1", "3", "4", "6", "14", "99", "42", "", "09"])
def test_other_err_codes_are_not_opt_outs(err_code: str) -> None:
    provider = make_provider(make_settings())
    params = {**DOCUMENTED_DLR, "status": "failed", "err-code": err_code}

    report = provider.parse_status_callback(callback(params))

    assert not report.recipient_opted_out


# --- inbound messages --------------------------------------------------------------------------


def inbound_callback(params: Mapping[str, str]) -> CallbackRequest:
    """An inbound message as the route hands it over (Vonage signs no URL, only parameters)."""
    return CallbackRequest(
        url="https://sms.example.com/v1/webhooks/vonage/inbound",
        method="POST",
        params=dict(params),
        headers={"content-type": "application/json"},
    )


def inbound(**changes: str | None) -> dict[str, str]:
    """`VONAGE_INBOUND` (a real inbound text) with fields changed, added, or (None) removed."""
    params: dict[str, str] = dict(VONAGE_INBOUND)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return params


def signed_inbound(secret: str = "s3cr3t", **changes: str | None) -> dict[str, str]:
    """An inbound message signed with sha256, as sent with signing on (`api-key`, `nonce`)."""
    params = inbound(
        **{
            "api-key": "abcd1234",
            "timestamp": str(int(NOW)),
            "nonce": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
            **changes,
        }
    )
    params["sig"] = documented_sig(params, secret, "sha256")
    return params


def test_documented_inbound_message_is_parsed() -> None:
    provider = make_provider(make_settings())

    message = provider.parse_inbound(inbound_callback(VONAGE_INBOUND))

    assert message == InboundSms(
        provider_message_id="020000001B0FE827",
        from_="+14843472194",
        to="+13239877404",
        body="Test again",
        num_segments=1,
        part=None,
        raw=VONAGE_INBOUND,
    )


def test_signed_inbound_message_parses_after_verification() -> None:
    # Vonage's own signed inbound vector: a keyword, a nonce, and '&' and '=' in the text.
    provider = make_provider(make_settings("md5hash"), now=1491346667)
    request = inbound_callback(VONAGE_INBOUND_AMP_EQ)

    assert provider.verify_callback(request)
    message = provider.parse_inbound(request)
    assert (message.provider_message_id, message.body) == ("0B00000042AC53BD", "Test with & and =")
    assert (message.from_, message.to) == ("+14843472194", "+12192259404")
    assert message.raw == VONAGE_INBOUND_AMP_EQ


def test_unknown_inbound_parameters_are_signed_and_kept() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    params = signed_inbound(**{"network-code": "23410", "future-field": "x=y&z"})
    request = inbound_callback(params)

    assert provider.verify_callback(request)
    message = provider.parse_inbound(request)
    assert message.raw == params
    assert message.body == "Test again"


def test_unicode_inbound_text_is_the_body() -> None:
    provider = make_provider(make_settings())
    params = inbound(type="unicode", text="Ваш код ✓", keyword="ВАШ")

    assert provider.parse_inbound(inbound_callback(params)).body == "Ваш код ✓"


def test_inbound_without_text_has_an_empty_body() -> None:
    provider = make_provider(make_settings())

    assert provider.parse_inbound(inbound_callback(inbound(text=None))).body == ""


def test_binary_inbound_has_no_body_and_keeps_its_data() -> None:
    provider = make_provider(make_settings())
    params = inbound(type="binary", text=None, data="48656c6c6f", udh="0605040b8423f0")

    message = provider.parse_inbound(inbound_callback(params))

    assert message.body == ""
    assert (message.raw["data"], message.raw["udh"]) == ("48656c6c6f", "0605040b8423f0")
    # Even if a binary message carried text, it is not text we could read as the body.
    assert provider.parse_inbound(inbound_callback({**params, "text": "\x05\x00"})).body == ""


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("13239877404", "+13239877404"),  # a long number: E.164 without its '+'
        ("447700900000", "+447700900000"),
        ("123456789", "+123456789"),  # nine digits: longer than any short code
        ("12345678", "12345678"),  # eight digits or fewer: a short code, no country prefix
        ("12345", "12345"),
        ("AcmeInc", "AcmeInc"),  # an alphanumeric address
        ("+447700900000", "+447700900000"),  # not all digits: as given
    ],
)
def test_inbound_to_address(to: str, expected: str) -> None:
    provider = make_provider(make_settings())

    assert provider.parse_inbound(inbound_callback(inbound(to=to))).to == expected


@pytest.mark.parametrize(
    ("msisdn", "expected"),
    [
        ("14843472194", "+14843472194"),
        ("447700900001", "+447700900001"),
        ("VONAGE", "VONAGE"),  # an alphanumeric sender ID
        ("+447700900001", "+447700900001"),
    ],
)
def test_inbound_from_address(msisdn: str, expected: str) -> None:
    provider = make_provider(make_settings())

    assert provider.parse_inbound(inbound_callback(inbound(msisdn=msisdn))).from_ == expected


def test_concatenated_parts_are_located() -> None:
    provider = make_provider(make_settings("sha256", secret="s3cr3t"))
    texts = ["The first 153 characters", " then the next 153", " and the rest."]
    parts = []
    # Vonage may deliver parts in any order; each carries its place in the whole.
    for number in (2, 3, 1):
        params = signed_inbound(
            messageId=f"0A000000012345A{number}",
            text=texts[number - 1],
            concat="true",
            **{"concat-ref": "108", "concat-total": "3", "concat-part": str(number)},
        )
        request = inbound_callback(params)
        assert provider.verify_callback(request)
        parts.append(provider.parse_inbound(request))

    assert [message.part for message in parts] == [
        InboundPart(reference="108", total=3, number=2),
        InboundPart(reference="108", total=3, number=3),
        InboundPart(reference="108", total=3, number=1),
    ]
    assert {message.num_segments for message in parts} == {3}
    assert [message.provider_message_id for message in parts] == [
        "0A000000012345A2",
        "0A000000012345A3",
        "0A000000012345A1",
    ]
    assert [message.body for message in parts] == [texts[1], texts[2], texts[0]]


@pytest.mark.parametrize(
    ("total", "number"),
    [
        ("3", "0"),  # parts are numbered from 1
        ("3", "4"),  # past the last part
        ("0", "1"),
        ("three", "1"),
        ("3", "one"),
        ("3", ""),
        ("", "1"),
        ("3", "-1"),
        ("3", "1.0"),
        ("3", "²"),
        ("9" * 5000, "1"),
        ("3", None),
        (None, "1"),
    ],
)
def test_concatenated_part_with_bad_numbers_is_invalid(
    total: str | None, number: str | None
) -> None:
    provider = make_provider(make_settings())
    params = inbound(
        concat="true", **{"concat-ref": "108", "concat-total": total, "concat-part": number}
    )

    with pytest.raises(InvalidCallback):
        provider.parse_inbound(inbound_callback(params))


@pytest.mark.parametrize("reference", [None, ""])
def test_concatenated_part_without_a_reference_is_invalid(reference: str | None) -> None:
    provider = make_provider(make_settings())
    params = inbound(
        concat="true", **{"concat-ref": reference, "concat-total": "3", "concat-part": "1"}
    )

    with pytest.raises(InvalidCallback):
        provider.parse_inbound(inbound_callback(params))


@pytest.mark.parametrize("concat", ["true", "True", "TRUE"])
def test_the_concat_flag_is_read_in_any_case(concat: str) -> None:
    provider = make_provider(make_settings())
    params = inbound(concat=concat, **{"concat-ref": "7", "concat-total": "2", "concat-part": "2"})

    message = provider.parse_inbound(inbound_callback(params))

    assert message.part == InboundPart(reference="7", total=2, number=2)
    assert message.num_segments == 2


@pytest.mark.parametrize("concat", [None, "false", ""])
def test_a_message_not_flagged_concatenated_is_whole(concat: str | None) -> None:
    provider = make_provider(make_settings())
    # Without `concat` = true the other concat fields mean nothing, however they look.
    params = inbound(concat=concat, **{"concat-ref": "x", "concat-total": "0", "concat-part": "9"})

    message = provider.parse_inbound(inbound_callback(params))

    assert (message.part, message.num_segments) == (None, 1)


@pytest.mark.parametrize("missing", ["messageId", "msisdn", "to"])
@pytest.mark.parametrize("empty", [False, True])
def test_inbound_without_id_sender_or_recipient_is_invalid(missing: str, empty: bool) -> None:
    provider = make_provider(make_settings())
    params = inbound(**{missing: "" if empty else None})

    with pytest.raises(InvalidCallback):
        provider.parse_inbound(inbound_callback(params))
