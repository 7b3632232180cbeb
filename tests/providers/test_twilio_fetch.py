"""Status checks at Twilio (FetchMessage), checked against Twilio's OpenAPI description
(`tests/fixtures/twilio_fetch_message.json`, extracted by `extract_twilio_fetch.py`)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest

from app.kernel.status import MessageStatus
from app.providers.base import ErrorKind, ProviderError, StatusReport
from tests.fixtures.extract_twilio_fetch import FIXTURE
from tests.providers.test_twilio import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    MESSAGE_SID,
    as_json_schema,
    make_provider,
    message_body,
)

SPEC: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))


def assert_valid_fetch_message(request: httpx.Request, auth_token: str = AUTH_TOKEN) -> str:
    """The Sid fetched; fails unless the request is a valid FetchMessage call."""
    assert SPEC["operation_id"] == "FetchMessage"
    assert request.method == SPEC["method"]
    template = re.escape(SPEC["path"]).replace(r"\{AccountSid\}", "(?P<AccountSid>[^/]+)")
    template = template.replace(r"\{Sid\}", "(?P<Sid>[^/]+)")
    match = re.fullmatch(template, request.url.path)
    assert match is not None, request.url.path
    declared = {p["name"]: p for p in SPEC["parameters"] if p["in"] == "path"}
    assert set(declared) == set(match.groupdict())
    for name, value in match.groupdict().items():
        jsonschema.validate(value, as_json_schema(declared[name]["schema"]))
    assert match["AccountSid"] == ACCOUNT_SID
    assert not request.url.params  # FetchMessage takes no query parameters
    kind, _, credentials = request.headers.get("authorization", "").partition(" ")
    assert kind == "Basic"
    assert base64.b64decode(credentials).decode() == f"{ACCOUNT_SID}:{auth_token}"
    return match["Sid"]


def fetched(**changes: Any) -> dict[str, Any]:
    """A FetchMessage body, valid against the spec's response schema."""
    body = message_body(**changes)
    jsonschema.validate(body, as_json_schema(SPEC["response_schema"]))
    return body


async def fetch(handler: Any, sid: str = MESSAGE_SID) -> StatusReport | None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        return await make_provider(http).fetch_status(sid)


async def test_fetches_the_message_and_maps_its_status_like_a_callback() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(assert_valid_fetch_message(request))
        return httpx.Response(200, json=fetched(status="delivered", date_sent=None))

    report = await fetch(handler)

    assert seen == [MESSAGE_SID]
    assert report is not None
    assert (report.provider_message_id, report.provider_status, report.status) == (
        MESSAGE_SID,
        "delivered",
        MessageStatus.DELIVERED,
    )
    assert report.error_code is None


async def test_a_failed_message_carries_its_error_code_and_opt_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert_valid_fetch_message(request)
        body = fetched(status="failed", error_code=21610, error_message="Unsubscribed recipient")
        return httpx.Response(200, json=body)

    report = await fetch(handler)

    assert report is not None
    assert (report.status, report.error_code) == (MessageStatus.FAILED, "21610")
    assert report.error_message == "Unsubscribed recipient"
    assert report.recipient_opted_out


async def test_a_message_twilio_does_not_know_has_no_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert_valid_fetch_message(request)
        return httpx.Response(404, json={"code": 20404, "message": "not found", "status": 404})

    assert await fetch(handler) is None


async def test_a_sid_that_is_not_a_message_sid_is_not_asked_about() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    assert await fetch(handler, sid="not-a-sid") is None


@pytest.mark.parametrize(
    ("status", "kind"), [(401, ErrorKind.PERMANENT), (503, ErrorKind.RETRYABLE)]
)
async def test_an_error_answer_raises(status: int, kind: ErrorKind) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"code": 20003, "message": "nope"})

    with pytest.raises(ProviderError) as caught:
        await fetch(handler)
    assert caught.value.kind is kind
