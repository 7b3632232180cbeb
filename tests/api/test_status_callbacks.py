"""Status callbacks from Twilio and Vonage: signatures, the state machine, duplicates, order."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.conftest import PUBLIC_BASE_URL, TWILIO_TOKEN, VONAGE_SIGNATURE_SECRET, World
from tests.domain.test_delivery import load, queued_message

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

TWILIO_PATH = "/v1/webhooks/twilio/status"
VONAGE_PATH = "/v1/webhooks/vonage/status"
SID = "SM" + "cd" * 16


def twilio_signature(url: str, params: dict[str, str], token: str = TWILIO_TOKEN) -> str:
    """Twilio's documented scheme: base64(HMAC-SHA1(token, url + sorted name/value pairs))."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(
        hmac.new(token.encode(), payload.encode(), hashlib.sha1).digest()
    ).decode()


def vonage_signed(params: dict[str, str], secret: str = VONAGE_SIGNATURE_SECRET) -> dict[str, str]:
    """Vonage's documented scheme: HMAC-SHA256 over '&k=v' sorted, '&' and '=' in values as '_'."""
    signed = {**params, "timestamp": str(int(time.time())), "nonce": uuid.uuid4().hex}
    base = "".join(
        f"&{key}={signed[key].replace('&', '_').replace('=', '_')}" for key in sorted(signed)
    )
    signed["sig"] = hmac.new(secret.encode(), base.encode(), hashlib.sha256).hexdigest().upper()
    return signed


async def twilio_callback(
    api: httpx.AsyncClient, message_id: uuid.UUID | str, status: str, **extra: str
) -> httpx.Response:
    path = f"{TWILIO_PATH}?message_id={message_id}"
    params = {
        "MessageSid": SID,
        "SmsSid": SID,
        "AccountSid": "AC" + "0123456789abcdef" * 2,
        "MessageStatus": status,
        "SmsStatus": status,
        "To": "+14155550123",
        "From": "+14155550100",
        "ApiVersion": "2010-04-01",
        **extra,
    }
    signature = twilio_signature(PUBLIC_BASE_URL + path, params)
    return await api.post(path, data=params, headers={"X-Twilio-Signature": signature})


async def sent_message(session_factory: SessionFactory, world: World, **fields: Any) -> uuid.UUID:
    return await queued_message(
        session_factory, world, status="sent", provider_message_id=SID, **fields
    )


async def sent_vonage_message(session_factory: SessionFactory, world: World) -> uuid.UUID:
    return await queued_message(
        session_factory,
        world,
        sender=world.vonage_sender,
        status="sent",
        provider_message_id="0A0000000123ABCD1",
    )


async def events(session_factory: SessionFactory, message_id: uuid.UUID) -> list[tuple[Any, ...]]:
    async with session_factory() as session:
        rows = await session.execute(
            select(MessageEvent.source, MessageEvent.status, MessageEvent.applied)
            .where(MessageEvent.message_id == message_id)
            .order_by(MessageEvent.id)
        )
        return [tuple(row) for row in rows]


async def test_a_signed_twilio_delivered_callback_delivers_the_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)

    response = await twilio_callback(api, message_id, "delivered")

    assert response.status_code == 204, response.text
    assert (await load(session_factory, message_id)).status == "delivered"
    assert await events(session_factory, message_id) == [("twilio", "delivered", True)]


async def test_callbacks_out_of_order_and_duplicated_never_move_back(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)

    for status in ["delivered", "sent", "delivered", "queued", "failed"]:
        assert (await twilio_callback(api, message_id, status)).status_code == 204

    assert (await load(session_factory, message_id)).status == "delivered"
    assert await events(session_factory, message_id) == [
        ("twilio", "delivered", True),
        ("twilio", "sent", False),
        ("twilio", "delivered", False),
        ("twilio", "sent", False),  # Twilio's "queued" means Twilio holds it: our "sent"
        ("twilio", "failed", False),
    ]


async def test_a_failure_report_carries_the_providers_error_code(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)

    await twilio_callback(api, message_id, "undelivered", ErrorCode="30003")

    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("undelivered", "30003")


async def test_a_report_that_beats_the_workers_record_still_applies(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # The worker has not yet stored Twilio's SID: the message id in the callback URL finds it.
    message_id = await queued_message(session_factory, world, status="sending")

    await twilio_callback(api, message_id, "delivered")

    message = await load(session_factory, message_id)
    assert (message.status, message.provider_message_id) == ("delivered", SID)


async def test_unknown_parameters_are_part_of_the_signature_and_do_not_break_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)

    response = await twilio_callback(
        api, message_id, "delivered", RawDlrDoneDate="2611261000", NewTwilioField="x"
    )

    assert response.status_code == 204
    assert (await load(session_factory, message_id)).status == "delivered"


@pytest.mark.parametrize(
    "tamper",
    ["no_signature", "wrong_token", "changed_status", "changed_url"],
)
async def test_unsigned_or_tampered_twilio_callbacks_are_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, tamper: str
) -> None:
    message_id = await sent_message(session_factory, world)
    path = f"{TWILIO_PATH}?message_id={message_id}"
    params = {"MessageSid": SID, "MessageStatus": "delivered"}
    headers = {"X-Twilio-Signature": twilio_signature(PUBLIC_BASE_URL + path, params)}
    if tamper == "no_signature":
        headers = {}
    elif tamper == "wrong_token":
        headers = {"X-Twilio-Signature": twilio_signature(PUBLIC_BASE_URL + path, params, "x")}
    elif tamper == "changed_status":
        params = {**params, "MessageStatus": "failed"}
    else:
        path = f"{TWILIO_PATH}?message_id={uuid.uuid4()}"

    response = await api.post(path, data=params, headers=headers)

    assert_problem(response, 403, "invalid_signature")
    assert (await load(session_factory, message_id)).status == "sent"
    assert await events(session_factory, message_id) == []


async def test_a_signed_callback_for_an_unknown_message_is_acknowledged(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await twilio_callback(api, uuid.uuid4(), "delivered")

    assert response.status_code == 204
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(MessageEvent)) == 0


async def test_a_signed_but_malformed_callback_is_a_400_class_error(
    api: httpx.AsyncClient, world: World
) -> None:
    path = f"{TWILIO_PATH}?message_id={uuid.uuid4()}"
    params = {"AccountSid": "AC" + "0" * 32}
    response = await api.post(
        path,
        data=params,
        headers={"X-Twilio-Signature": twilio_signature(PUBLIC_BASE_URL + path, params)},
    )

    assert_problem(response, 422, "invalid_callback")


@pytest.mark.parametrize("method", ["GET", "POST-form", "POST-json"])
async def test_a_signed_vonage_receipt_delivers_the_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, method: str
) -> None:
    message_id = await sent_vonage_message(session_factory, world)
    params = vonage_signed(
        {
            "msisdn": "14155550123",
            "to": "ACME",
            "network-code": "310260",
            "messageId": "0A0000000123ABCD1",
            "price": "0.03330000",
            "status": "delivered",
            "scts": "2611261000",
            "err-code": "0",
            "client-ref": str(message_id),
            "message-timestamp": "2026-11-26 10:00:00",
        }
    )

    if method == "GET":
        response = await api.get(VONAGE_PATH, params=params)
    elif method == "POST-form":
        response = await api.post(VONAGE_PATH, data=params)
    else:
        response = await api.post(VONAGE_PATH, json=params)

    assert response.status_code == 204, response.text
    assert (await load(session_factory, message_id)).status == "delivered"


async def test_a_vonage_receipt_with_a_bad_signature_is_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_vonage_message(session_factory, world)
    params = vonage_signed(
        {"messageId": "0A0000000123ABCD1", "status": "delivered", "client-ref": str(message_id)},
        secret="not-the-secret",
    )

    response = await api.get(VONAGE_PATH, params=params)

    assert_problem(response, 403, "invalid_signature")
    assert (await load(session_factory, message_id)).status == "sent"


async def test_a_vonage_failure_receipt_records_its_err_code(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_vonage_message(session_factory, world)
    params = vonage_signed(
        {
            "messageId": "0A0000000123ABCD1",
            "status": "failed",
            "err-code": "6",
            "client-ref": str(message_id),
        }
    )

    await api.get(VONAGE_PATH, params=params)

    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("failed", "6")


async def test_a_twilio_callback_cannot_touch_a_vonage_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await queued_message(
        session_factory, world, sender=world.vonage_sender, status="sent"
    )

    await twilio_callback(api, message_id, "delivered")

    assert (await load(session_factory, message_id)).status == "sent"


async def test_the_message_resource_shows_the_history(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)
    await twilio_callback(api, message_id, "delivered")
    await twilio_callback(api, message_id, "sent")

    response = await api.get(f"/v1/messages/{message_id}", headers=world.auth())

    assert response.status_code == 200
    assert [step["status"] for step in response.json()["history"]] == ["delivered"]
    assert response.json()["status"] == "delivered"


async def test_messages_table_is_untouched_by_a_refused_callback(
    api: httpx.AsyncClient, session_factory: SessionFactory, world: World
) -> None:
    before = await load(session_factory, await sent_message(session_factory, world))

    await api.post(TWILIO_PATH, data={"MessageSid": SID, "MessageStatus": "failed"})

    after = await load(session_factory, before.id)
    assert (after.status, after.updated_at) == (before.status, before.updated_at)
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 1


def _statements() -> float:
    return REGISTRY.get_sample_value("smsgate_db_statements_total") or 0.0


def _counted(status: str) -> float:
    labels = {"status": status, "provider": "twilio", "sender": "+14155550100"}
    return REGISTRY.get_sample_value("smsgate_messages_total", labels) or 0.0


async def _unknown_sid_callback(api: httpx.AsyncClient) -> httpx.Response:
    params = {"MessageSid": "SM" + "ef" * 16, "MessageStatus": "delivered"}
    signature = twilio_signature(PUBLIC_BASE_URL + TWILIO_PATH, params)
    return await api.post(TWILIO_PATH, data=params, headers={"X-Twilio-Signature": signature})


async def test_a_callback_costs_one_sql_statement_and_counts_its_move_once(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """Find, lock, move, history row: one statement (the client has no endpoint to tell), the
    news counted in the messages metric once; a duplicate and an unknown id cost one too."""
    await _unknown_sid_callback(api)  # the app's connections, opened
    message_id = await sent_message(session_factory, world)
    delivered = _counted("delivered")

    for _ in range(2):  # the news, then the provider repeating itself
        before = _statements()
        response = await twilio_callback(api, message_id, "delivered", ErrorCode="0")
        assert response.status_code == 204
        assert _statements() - before == 1
    before = _statements()
    assert (await _unknown_sid_callback(api)).status_code == 204
    assert _statements() - before == 1

    assert _counted("delivered") - delivered == 1
    async with session_factory() as session:
        rows = (
            await session.execute(
                select(
                    MessageEvent.status,
                    MessageEvent.applied,
                    MessageEvent.provider_status,
                    MessageEvent.error_code,
                    MessageEvent.payload,
                )
                .where(MessageEvent.message_id == message_id)
                .order_by(MessageEvent.id)
            )
        ).all()
    assert [tuple(row[:4]) for row in rows] == [
        ("delivered", True, "delivered", "0"),
        ("delivered", False, "delivered", "0"),
    ]
    assert rows[0].payload["MessageSid"] == SID and rows[0].payload["ErrorCode"] == "0"


async def test_a_callback_without_our_id_finds_the_message_by_the_providers(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await sent_message(session_factory, world)
    params = {"MessageSid": SID, "MessageStatus": "undelivered", "ErrorCode": "30005"}
    signature = twilio_signature(PUBLIC_BASE_URL + TWILIO_PATH, params)

    response = await api.post(TWILIO_PATH, data=params, headers={"X-Twilio-Signature": signature})

    assert response.status_code == 204, response.text
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("undelivered", "30005")


async def test_concurrent_final_reports_for_one_message_apply_exactly_one(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """Decided on the locked row: the second report sees the first one's status."""
    message_id = await sent_message(session_factory, world)

    responses = await asyncio.gather(
        *(
            twilio_callback(api, message_id, status)
            for status in ["delivered", "undelivered", "failed", "delivered"]
        )
    )

    assert [r.status_code for r in responses] == [204] * 4
    rows = await events(session_factory, message_id)
    assert len(rows) == 4
    [(_, winner, _)] = [row for row in rows if row[2]]
    assert (await load(session_factory, message_id)).status == winner
