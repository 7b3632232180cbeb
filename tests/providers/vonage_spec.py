"""Vonage's published SMS API contract, as the tests hold the adapter's requests against it.

The contract is the send-an-sms operation extracted from Vonage's API description
(`tests/fixtures/vonage_send_sms.json`, written by `tests/fixtures/extract_vonage_schema.py`).
Every fake Vonage in the tests passes each request through `assert_valid_send_sms`, so no
request the adapter makes in any test goes unchecked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jsonschema  # type: ignore[import-untyped]

from tests.fixtures.extract_vonage_schema import FIXTURE

SPEC: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))

# Said in the field's description only ("up to 40 characters"), not as a `maxLength`.
CLIENT_REF_MAX_CHARS = 40


def coerce(values: list[str], schema: Mapping[str, Any]) -> Any:
    """A form field's text in the type its schema declares; unparseable text stays a string
    (so the schema refuses it: `status-report-req=1` is not a boolean)."""
    assert len(values) == 1, f"field sent {len(values)} times"
    value = values[0]
    kind = schema.get("type")
    if kind == "integer" and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    if kind == "boolean":
        return {"true": True, "false": False}.get(value, value)
    return value


def form_fields(request: httpx.Request) -> dict[str, Any]:
    """The request's form fields, each in the type the spec gives it."""
    properties = SPEC["request_body_schema"]["properties"]
    raw = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    return {name: coerce(values, properties.get(name, {})) for name, values in raw.items()}


def assert_valid_send_sms(request: httpx.Request) -> dict[str, Any]:
    """The request's (typed) form fields; fails unless it is a valid send-an-sms call."""
    assert request.method == SPEC["method"]
    # `{server path}/{format}`: the adapter's base URL replaces the server's origin only.
    server_path = urlsplit(SPEC["servers"][0]["url"]).path
    prefix, _, format_ = request.url.path.rpartition("/")
    assert prefix == server_path, f"{request.url.path} is not {server_path}{SPEC['path']}"
    (format_parameter,) = SPEC["path_parameters"]
    jsonschema.validate(format_, format_parameter["schema"])
    assert format_ == "json", "the adapter reads JSON responses"

    assert request.headers["content-type"] == SPEC["request_content_type"]
    form = form_fields(request)
    # The spec leaves additionalProperties open; Vonage ignores unknown fields, so a misspelled
    # one would silently drop a setting. Closing the schema makes that a test failure.
    jsonschema.validate(
        form, {**SPEC["request_body_schema"], "type": "object", "additionalProperties": False}
    )

    # Constraints the spec states only in prose.
    assert ("api_secret" in form) != ("sig" in form), "api_secret, or else sig (status 32)"
    assert re.fullmatch(r"[0-9]{7,15}", form["to"]), "to: digits only, no '+'"
    assert len(form.get("client-ref", "")) <= CLIENT_REF_MAX_CHARS
    if "callback" in form:
        callback = urlsplit(form["callback"])
        assert callback.scheme in {"http", "https"} and callback.hostname
    return form


def validating(handler: Any) -> Any:
    """`handler` (a fake Vonage) that first checks each request against the spec."""

    def checked(request: httpx.Request) -> httpx.Response:
        assert_valid_send_sms(request)
        response: httpx.Response = handler(request)
        return response

    return checked
