"""Reconciliation's lookup at Twilio (ListMessage), checked against Twilio's OpenAPI description
(`tests/fixtures/twilio_list_messages.json`, extracted by `extract_twilio_list.py`)."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest

from app.kernel.status import MessageStatus
from app.providers.base import ErrorKind, ProviderError, Submission
from app.providers.twilio import TRIAL_PREFIX
from tests.fixtures.extract_twilio_list import FIXTURE
from tests.providers.test_twilio import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    MESSAGE_SID,
    as_json_schema,
    coerce,
    make_provider,
    make_sms,
    message_body,
)

SPEC: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
CLAIMED_AT = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
OTHER_SID = "SM" + "0f" * 16


def assert_valid_list_message(request: httpx.Request) -> dict[str, Any]:
    """The query parameters; fails unless the request is a valid ListMessage call."""
    assert SPEC["operation_id"] == "ListMessage"
    assert request.method == SPEC["method"]
    assert request.url.path == SPEC["path"].replace("{AccountSid}", ACCOUNT_SID)
    kind, _, credentials = request.headers.get("authorization", "").partition(" ")
    assert kind == "Basic"
    assert base64.b64decode(credentials).decode() == f"{ACCOUNT_SID}:{AUTH_TOKEN}"
    declared = {p["name"]: p for p in SPEC["parameters"] if p["in"] == "query"}
    query: dict[str, Any] = {}
    for name in request.url.params:
        assert name in declared, f"{name} is not a ListMessage query parameter"
        schema = declared[name]["schema"]
        value = coerce(request.url.params.get_list(name), schema)
        jsonschema.validate(value, as_json_schema(schema))
        query[name] = value
    # What the spec states only in prose: DateSent filters take GMT dates, YYYY-MM-DD.
    for name in ("DateSent", "DateSent<", "DateSent>"):
        if name in query:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", query[name]), query[name]
    return query


def listing(*messages: dict[str, Any], next_page_uri: str | None = None) -> dict[str, Any]:
    """A ListMessage page, valid against the spec's response schema."""
    uri = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?PageSize=100&Page=0"
    body = {
        "end": len(messages) - 1,
        "first_page_uri": uri,
        "next_page_uri": next_page_uri,
        "page": 0,
        "page_size": 100,
        "previous_page_uri": None,
        "start": 0,
        "uri": uri,
        "messages": list(messages),
    }
    jsonschema.validate(body, as_json_schema(SPEC["response_schema"]))
    return body


def listed(created: datetime, **changes: Any) -> dict[str, Any]:
    return message_body(date_created=format_datetime(created, usegmt=True), **changes)


async def lookup(pages: list[dict[str, Any]]) -> tuple[list[Submission], list[dict[str, Any]]]:
    """Run a lookup against canned pages (served in order); the queries it made."""
    queries: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(assert_valid_list_message(request))
        return httpx.Response(200, json=pages[min(len(queries) - 1, len(pages) - 1)])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = await make_provider(http).find_submissions(make_sms(), since=CLAIMED_AT)
    return found, queries


async def test_lookup_lists_messages_to_and_from_the_numbers_since_the_claim() -> None:
    found, queries = await lookup([listing(listed(CLAIMED_AT + timedelta(seconds=1)))])

    assert found == [
        Submission(MESSAGE_SID, "queued", MessageStatus.SENT, CLAIMED_AT + timedelta(seconds=1))
    ]
    assert queries[0] == {
        "To": "+14155550123",
        "From": "+14155552345",
        "DateSent>": "2026-11-26",
        "PageSize": 100,
    }
    # Messages Twilio holds but has not sent (no date_sent) are looked for without a date.
    assert queries[1] == {"To": "+14155550123", "From": "+14155552345", "PageSize": 100}


async def test_lookup_ignores_other_bodies_older_messages_and_inbound_ones() -> None:
    early = CLAIMED_AT - timedelta(minutes=10)
    found, _ = await lookup(
        [
            listing(
                listed(CLAIMED_AT, sid=OTHER_SID, body="Your code is 999999"),
                listed(CLAIMED_AT, sid=OTHER_SID, direction="inbound"),
                listed(early, sid=OTHER_SID),
            )
        ]
    )

    assert found == []


async def test_lookup_sees_through_the_trial_prefix_and_reports_the_status() -> None:
    found, _ = await lookup(
        [listing(listed(CLAIMED_AT, body=TRIAL_PREFIX + "Your code is 123456", status="delivered"))]
    )

    assert [(s.provider_message_id, s.status) for s in found] == [
        (MESSAGE_SID, MessageStatus.DELIVERED)
    ]


async def test_lookup_follows_next_page_until_older_than_the_claim() -> None:
    next_uri = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?PageSize=100&Page=1&PageToken=PA1"
    first = listing(
        listed(CLAIMED_AT + timedelta(seconds=30), sid=OTHER_SID, body="other"),
        next_page_uri=next_uri,
    )
    second = listing(listed(CLAIMED_AT + timedelta(seconds=2)))
    third = listing()  # the undated query

    found, queries = await lookup([first, second, third])

    assert [s.provider_message_id for s in found] == [MESSAGE_SID]
    assert queries[1] == {"PageSize": 100, "Page": 1, "PageToken": "PA1"}
    assert len(queries) == 3


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(503, json={"code": 20503, "message": "Unavailable"}), ErrorKind.RETRYABLE),
        (httpx.Response(401, json={"code": 20003, "message": "Auth"}), ErrorKind.PERMANENT),
        (httpx.Response(200, text="not json"), ErrorKind.RETRYABLE),
    ],
)
async def test_a_lookup_twilio_cannot_answer_raises(
    response: httpx.Response, kind: ErrorKind
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _: response)) as http:
        with pytest.raises(ProviderError) as caught:
            await make_provider(http).find_submissions(make_sms(), since=CLAIMED_AT)

    assert caught.value.kind is kind
