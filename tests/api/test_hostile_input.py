"""Input a careless or hostile client (or a forged webhook) sends: letters in phone numbers, lone
surrogates and NUL in every kind of text field, one bad item among good ones. Each is refused
with a problem naming the field, stores nothing, and never answers 5xx."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import IdempotencyKey, Message
from app.db.session import SessionFactory
from app.kernel.phone import InvalidPhoneNumber, canonical_phone, normalize_phone
from tests.api.test_send import assert_problem
from tests.conftest import World

LONE_SURROGATE = "\\ud800"  # as written in the JSON text: valid JSON, no UTF-8 for it
NUL = "\\u0000"


async def post_json(
    api: httpx.AsyncClient, path: str, text: str, headers: dict[str, str]
) -> httpx.Response:
    """POST `text` as it is: json.dumps would not let us write a lone surrogate escape."""
    return await api.post(
        path, content=text.encode(), headers={**headers, "content-type": "application/json"}
    )


async def stored_messages(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


# ---- Letters in phone numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["+1415555XXXX", "+1 (415) 555-CALL", "1-800-FLOWERS", "+14155550123x", "(415) 555-O123"]
)
def test_letters_are_never_read_as_keypad_digits(raw: str) -> None:
    with pytest.raises(InvalidPhoneNumber, match="only digits"):
        normalize_phone(raw, "US")
    assert canonical_phone(raw, "US") is None  # an inbound "from" such as 1800FLOWERS


@pytest.mark.parametrize(
    "raw",
    ["+14155550123", "(415) 555-0123", "+1 415.555.0123", " 415/555-0123 ", "+33 6 12 34 56 78"],
)
def test_digits_and_the_usual_separators_still_are_numbers(raw: str) -> None:
    assert normalize_phone(raw, "US").startswith("+")


@pytest.mark.parametrize("to", ["+1415555XXXX", "+1 (415) 555-CALL"])
async def test_a_to_with_letters_is_refused_naming_the_field(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, to: str
) -> None:
    single = await api.post("/v1/messages", json={"to": to, "body": "hi"}, headers=world.auth())
    batch = await api.post(
        "/v1/messages/batch",
        json={"messages": [{"to": "+14155550123", "body": "ok"}, {"to": to, "body": "hi"}]},
        headers=world.auth(),
    )
    listed = await api.get("/v1/messages", params={"to": to}, headers=world.auth())

    assert_problem(single, 422, "validation_error", field="to")
    assert batch.status_code == 200, batch.text
    results = batch.json()["data"]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["error"]["errors"][0]["field"] == "to"
    assert_problem(listed, 422, "validation_error", field="to")
    assert await stored_messages(session_factory) == 1  # the good batch item only


async def test_an_opt_out_for_a_number_with_letters_is_refused(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.put("/v1/opt-outs/+1415555CALL", headers=world.auth())

    assert_problem(response, 422, "validation_error", field="phone")


# ---- Lone surrogates and NUL, per field kind --------------------------------------------------

BAD_SEND_FIELDS = [
    ('"body": "hi{bad}"', "body"),
    ('"from": "{bad}"', "from"),
    ('"metadata": {{"order": "{bad}"}}', "metadata.order"),
    ('"metadata": {{"k{bad}": "1042"}}', "metadata"),
]


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL])
@pytest.mark.parametrize(("fragment", "field"), BAD_SEND_FIELDS)
@pytest.mark.parametrize("idempotency_key", [None, "hostile-1"])
async def test_unstorable_text_in_a_send_is_refused_naming_the_field(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    bad: str,
    fragment: str,
    field: str,
    idempotency_key: str | None,
) -> None:
    text = '{"to": "+14155550123", "body": "hi", ' + fragment.format(bad=bad) + "}"
    if fragment.startswith('"body"'):
        text = '{"to": "+14155550123", ' + fragment.format(bad=bad) + "}"
    headers = world.auth() | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})

    response = await post_json(api, "/v1/messages", text, headers)

    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert any(error["field"].startswith(field) for error in problem["errors"]), problem
    assert await stored_messages(session_factory) == 0


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL])
@pytest.mark.parametrize(("fragment", "field"), BAD_SEND_FIELDS)
@pytest.mark.parametrize("idempotency_key", [None, "hostile-batch"])
async def test_one_unstorable_item_never_fails_the_rest_of_a_batch(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    bad: str,
    fragment: str,
    field: str,
    idempotency_key: str | None,
) -> None:
    bad_item = '{"to": "+14155550123", "body": "hi", ' + fragment.format(bad=bad) + "}"
    if fragment.startswith('"body"'):
        bad_item = '{"to": "+14155550123", ' + fragment.format(bad=bad) + "}"
    text = (
        '{"messages": [{"to": "+14155550123", "body": "first"}, '
        + bad_item
        + ', {"to": "+14155550124", "body": "third"}]}'
    )
    headers = world.auth() | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})

    response = await post_json(api, "/v1/messages/batch", text, headers)

    assert response.status_code == 200, response.text
    results = response.json()["data"]
    assert [r["status"] for r in results] == ["accepted", "rejected", "accepted"]
    error = results[1]["error"]
    assert error["code"] == "validation_error"
    assert any(e["field"].startswith(field) for e in error["errors"]), error
    assert await stored_messages(session_factory) == 2
    if idempotency_key:  # the response, refused item included, was stored and replays
        replay = await post_json(api, "/v1/messages/batch", text, headers)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.json() == response.json()
        async with session_factory() as session:
            assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 1
        assert await stored_messages(session_factory) == 2


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL])
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ('{{"description": "a{bad}b"}}', "description"),
        (
            '{{"keywords": {{"custom": [{{"keyword": "HOURS{bad}", "reply": "9-5"}}]}}}}',
            "keywords.custom.0.keyword",
        ),
        (
            '{{"keywords": {{"custom": [{{"keyword": "HOURS", "reply": "9-5{bad}"}}]}}}}',
            "keywords.custom.0.reply",
        ),
    ],
)
async def test_unstorable_text_in_a_sender_patch_is_refused_naming_the_field(
    api: httpx.AsyncClient, world: World, bad: str, patch: str, field: str
) -> None:
    response = await api.patch(
        f"/v1/senders/{world.fake_sender.id}",
        content=patch.format(bad=bad).encode(),
        headers={**world.auth(world.admin_key), "content-type": "application/json"},
    )

    assert_problem(response, 422, "validation_error", field=field)


async def test_an_empty_custom_keyword_is_refused_as_the_schema_says(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.patch(
        f"/v1/senders/{world.fake_sender.id}",
        json={"keywords": {"custom": [{"keyword": "", "reply": "9-5"}]}},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="keywords.custom.0.keyword")


async def test_a_lone_surrogate_in_a_preview_is_refused(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await post_json(
        api, "/v1/messages/preview", '{"body": "hi' + LONE_SURROGATE + '"}', world.auth()
    )

    assert_problem(response, 422, "validation_error", field="body")


# ---- Provider webhooks ------------------------------------------------------------------------


def _hostile_webhook(path: str) -> tuple[str, dict[str, str]]:
    """A JSON body with a lone surrogate, with whatever signature the provider checks."""
    if "twilio" in path:
        body = '{"MessageSid": "SM1", "MessageStatus": "delivered", "Body": "x' + LONE_SURROGATE
        return body + '"}', {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}
    fields = {"timestamp": str(int(time.time())), "nonce": "n1", "messageId": "1"}
    body = json.dumps(fields)[:-1] + ', "text": "x' + LONE_SURROGATE + '", "sig": "ab' + "\\udc00"
    return body + '"}', {}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/webhooks/twilio/status",
        "/v1/webhooks/twilio/inbound",
        "/v1/webhooks/vonage/status",
        "/v1/webhooks/vonage/inbound",
    ],
)
async def test_a_webhook_with_a_lone_surrogate_and_a_signature_is_refused_not_a_500(
    api: httpx.AsyncClient, path: str
) -> None:
    body, headers = _hostile_webhook(path)

    response = await post_json(api, path, body, headers)

    assert_problem(response, 403, "invalid_signature")


# ---- Errors nothing handled -------------------------------------------------------------------


async def test_an_unexpected_error_is_a_problem_500_naming_nothing_of_the_input(
    api: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.sending import routes as messages

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom: +14155550123 said 'Your code is 1234'")

    monkeypatch.setattr(messages, "accept_messages", broken)
    response = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "hi"}, headers=world.auth()
    )

    assert_problem(response, 500, "internal_error")
    assert "x-request-id" in response.headers
    assert "14155550123" not in response.text and "boom" not in response.text
