"""Inbound webhooks, keywords, opt-outs and replies: the compliance engine end to end."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from app.consent.optouts import lock_recipients
from app.db.models import InboundMessage, Message, OptOut
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver_message
from tests.api.test_send import assert_problem
from tests.api.test_status_callbacks import twilio_signature, vonage_signed
from tests.conftest import PUBLIC_BASE_URL, REPLIES, World
from tests.domain.test_delivery import (
    POLICY,
    RecordingProvider,
    load,
    queued_message,
    twilio_created,
    twilio_error,
)
from tests.netguard import another_actor
from tests.queueing import queued_message_ids
from tests.test_end_to_end import run_worker

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

CUSTOMER = "+14155550123"
TWILIO_INBOUND = "/v1/webhooks/twilio/inbound"
VONAGE_INBOUND = "/v1/webhooks/vonage/inbound"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


async def twilio_inbound(
    api: httpx.AsyncClient,
    body: str,
    *,
    to: str = "+14155550100",
    sid: str | None = None,
    customer: str = CUSTOMER,
) -> httpx.Response:
    params = {
        "MessageSid": sid or "SM" + uuid.uuid4().hex,
        "AccountSid": "AC" + "0123456789abcdef" * 2,
        "From": customer,
        "To": to,
        "Body": body,
        "NumSegments": "1",
        "NumMedia": "0",
        "FromCountry": "US",
        "ApiVersion": "2010-04-01",
    }
    signature = twilio_signature(PUBLIC_BASE_URL + TWILIO_INBOUND, params)
    return await api.post(TWILIO_INBOUND, data=params, headers={"X-Twilio-Signature": signature})


async def replies(session_factory: SessionFactory) -> list[tuple[str, str, str]]:
    """The service's own messages: (kind, to, body), oldest first."""
    async with session_factory() as session:
        rows = await session.execute(
            select(Message.kind, Message.to, Message.body)
            .where(Message.client_id.is_(None))
            .order_by(Message.created_at)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def opt_out_rows(session_factory: SessionFactory) -> list[tuple[Any, ...]]:
    async with session_factory() as session:
        rows = await session.execute(
            select(
                OptOut.phone, OptOut.sender_id, OptOut.action, OptOut.source, OptOut.actor
            ).order_by(OptOut.id)
        )
        return [tuple(row) for row in rows]


async def send(api: httpx.AsyncClient, world: World, **body: Any) -> httpx.Response:
    return await api.post(
        "/v1/messages",
        json={"to": CUSTOMER, "body": "Your order #1042 has shipped.", **body},
        headers=world.auth(),
    )


async def test_stop_records_the_opt_out_confirms_once_and_blocks_sends(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    response = await twilio_inbound(api, "STOP")

    assert response.status_code == 200
    assert response.text == EMPTY_TWIML
    assert response.headers["content-type"].startswith("text/xml")
    assert await opt_out_rows(session_factory) == [
        (CUSTOMER, world.twilio_sender.id, "opt_out", "keyword", "recipient")
    ]
    assert await replies(session_factory) == [
        ("opt_out_confirmation", CUSTOMER, REPLIES["opt_out"]["en"])
    ]
    async with session_factory() as session:
        reply = await session.scalar(select(Message).where(Message.client_id.is_(None)))
        assert reply is not None and reply.from_ == "+14155550100"
    assert await queued_message_ids(redis) == [str(reply.id)]
    assert_problem(await send(api, world), 403, "recipient_opted_out")
    # Another sender was not asked to stop.
    assert (await send(api, world, **{"from": "+14155550199"})).status_code == 202


@pytest.mark.parametrize(
    ("body", "category", "language"),
    [
        *[
            (word, "opt_out", "en")
            for word in (
                "STOP",
                "STOPALL",
                "UNSUBSCRIBE",
                "CANCEL",
                "END",
                "QUIT",
                "REVOKE",
                "OPTOUT",
            )
        ],
        *[(word, "opt_out", "fr") for word in ("ARRET", "ARRETE", "DESABONNER")],
        ("Stop", "opt_out", "en"),
        (" stop. ", "opt_out", "en"),
        ("ARRÊT", "opt_out", "fr"),
        ("arret!", "opt_out", "fr"),
        ("Arrêté", "opt_out", "fr"),
        ("désabonner", "opt_out", "fr"),
        ("«Arrêt»", "opt_out", "fr"),
        ("quit!!!", "opt_out", "en"),
        *[(word, "help", "en") for word in ("HELP", "INFO", "help?", " Info ")],
        *[(word, "help", "fr") for word in ("AIDE", "aide !", "Aidé")],
    ],
)
async def test_keywords_and_their_variants_in_both_languages(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    body: str,
    category: str,
    language: str,
) -> None:
    await twilio_inbound(api, body)

    async with session_factory() as session:
        inbound = await session.scalar(select(InboundMessage))
    assert inbound is not None
    assert (inbound.keyword_category, inbound.language, inbound.body) == (category, language, body)
    kind = {"opt_out": "opt_out_confirmation", "help": "help_reply"}[category]
    assert await replies(session_factory) == [(kind, CUSTOMER, REPLIES[category][language])]
    opted_out = [row[2] for row in await opt_out_rows(session_factory)]
    assert opted_out == (["opt_out"] if category == "opt_out" else [])


@pytest.mark.parametrize("body", ["please stop texting me", "stop it now", "HELP ME", "STOP STOP"])
async def test_a_keyword_inside_a_sentence_does_nothing(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, body: str
) -> None:
    await twilio_inbound(api, body)

    async with session_factory() as session:
        inbound = await session.scalar(select(InboundMessage))
    assert inbound is not None and inbound.keyword is None and inbound.body == body
    assert await replies(session_factory) == []
    assert await opt_out_rows(session_factory) == []


async def test_a_retried_webhook_is_stored_once_and_acted_on_once(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sid = "SM" + "ee" * 16
    first, second = await asyncio.gather(
        twilio_inbound(api, "STOP", sid=sid), twilio_inbound(api, "STOP", sid=sid)
    )
    third = await twilio_inbound(api, "STOP", sid=sid)

    assert {first.status_code, second.status_code, third.status_code} == {200}
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(InboundMessage)) == 1
    assert len(await replies(session_factory)) == 1
    assert len(await opt_out_rows(session_factory)) == 1


async def test_a_second_stop_gets_no_second_confirmation(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "ARRET")

    assert [kind for kind, _, _ in await replies(session_factory)] == ["opt_out_confirmation"]


async def test_start_reverses_the_opt_out_and_confirms(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "start")

    assert [row[2] for row in await opt_out_rows(session_factory)] == ["opt_out", "opt_in"]
    assert await replies(session_factory) == [
        ("opt_out_confirmation", CUSTOMER, REPLIES["opt_out"]["en"]),
        ("opt_in_confirmation", CUSTOMER, REPLIES["opt_in"]["en"]),
    ]
    assert (await send(api, world)).status_code == 202


@pytest.mark.parametrize("keyword", ["START", "YES", "unstop"])
async def test_an_opt_in_keyword_from_a_number_not_opted_out_changes_nothing_and_gets_no_reply(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, keyword: str
) -> None:
    response = await twilio_inbound(api, keyword)

    assert response.status_code == 200, response.text
    assert await replies(session_factory) == []
    assert await opt_out_rows(session_factory) == []
    # After an opt-in by someone else (an admin), the customer's START still changes nothing.
    lifted = await api.delete(f"/v1/opt-outs/{CUSTOMER}", headers=world.auth(world.admin_key))
    assert lifted.status_code == 200
    await twilio_inbound(api, keyword)
    assert await replies(session_factory) == []
    assert (await send(api, world)).status_code == 202


async def test_a_second_start_gets_no_second_confirmation_and_no_row(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "START")
    await twilio_inbound(api, "YES")

    assert [row[2] for row in await opt_out_rows(session_factory)] == ["opt_out", "opt_in"]
    assert [kind for kind, _, _ in await replies(session_factory)] == [
        "opt_out_confirmation",
        "opt_in_confirmation",
    ]


async def test_help_is_answered_while_opted_out_and_the_worker_sends_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "HELP")
    provider = RecordingProvider(twilio_created)

    await run_worker(provider)

    bodies = [request.content.decode() for request in provider.requests]
    assert len(bodies) == 2  # the STOP confirmation and the HELP answer; nothing else
    async with session_factory() as session:
        statuses = dict((await session.execute(select(Message.kind, Message.status))).all())
    assert statuses == {"opt_out_confirmation": "sent", "help_reply": "sent"}


async def test_custom_keywords_reply_but_not_to_an_opted_out_number(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        sender = await session.get(type(world.twilio_sender), world.twilio_sender.id)
        assert sender is not None
        sender.keywords = {
            **sender.keywords,
            "custom": [{"keyword": "HOURS", "reply": "Open 9-5, Mon-Fri.", "language": "en"}],
        }

    await twilio_inbound(api, "hours?")
    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "HOURS")

    assert [(kind, body) for kind, _, body in await replies(session_factory)] == [
        ("keyword_reply", "Open 9-5, Mon-Fri."),
        ("opt_out_confirmation", REPLIES["opt_out"]["en"]),
    ]


async def test_a_message_to_an_unknown_number_is_acknowledged_and_recorded(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await twilio_inbound(api, "STOP", to="+14155550111")

    assert response.status_code == 200
    async with session_factory() as session:
        inbound = await session.scalar(select(InboundMessage))
    assert inbound is not None and inbound.sender_id is None and inbound.to == "+14155550111"
    assert await opt_out_rows(session_factory) == []
    assert await replies(session_factory) == []


@pytest.mark.parametrize("tamper", ["unsigned", "changed_body"])
async def test_an_unsigned_or_tampered_inbound_changes_nothing(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, tamper: str
) -> None:
    params = {"MessageSid": "SM" + "aa" * 16, "From": CUSTOMER, "To": "+14155550100"}
    headers = {}
    if tamper == "changed_body":
        headers["X-Twilio-Signature"] = twilio_signature(
            PUBLIC_BASE_URL + TWILIO_INBOUND, {**params, "Body": "HELLO"}
        )

    response = await api.post(TWILIO_INBOUND, data={**params, "Body": "STOP"}, headers=headers)

    assert_problem(response, 403, "invalid_signature")
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(InboundMessage)) == 0
    assert await opt_out_rows(session_factory) == []


async def test_a_vonage_arret_is_answered_in_french(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    params = vonage_signed(
        {
            "msisdn": "14155550123",
            "to": "ACME",
            "messageId": "0B00000012345678",
            "text": "Arrêt",
            "type": "unicode",
            "keyword": "ARRET",
            "message-timestamp": "2026-11-26 10:00:00",
        }
    )

    response = await api.get(VONAGE_INBOUND, params=params)

    assert response.status_code == 204, response.text
    assert await opt_out_rows(session_factory) == [
        (CUSTOMER, world.vonage_sender.id, "opt_out", "keyword", "recipient")
    ]
    assert await replies(session_factory) == [
        ("opt_out_confirmation", CUSTOMER, REPLIES["opt_out"]["fr"])
    ]


async def test_a_long_vonage_message_is_assembled_from_its_parts(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    texts = {1: "Where is my ", 2: "order #1042? ", 3: "Thanks"}
    for number in (3, 1, 2, 2):  # out of order, one part delivered twice
        params = vonage_signed(
            {
                "msisdn": "14155550123",
                "to": "ACME",
                "messageId": f"0C0000000000000{number}",
                "text": texts[number],
                "type": "text",
                "concat": "true",
                "concat-ref": "77",
                "concat-total": "3",
                "concat-part": str(number),
            }
        )
        assert (await api.post(VONAGE_INBOUND, data=params)).status_code == 204

    async with session_factory() as session:
        rows = list(await session.scalars(select(InboundMessage)))
    assert [(row.body, row.num_segments, row.provider_message_id) for row in rows] == [
        ("Where is my order #1042? Thanks", 3, "0C00000000000001")
    ]


async def test_a_service_wide_scope_stops_every_sender(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(opt_out_scope="service") as api:
        await twilio_inbound(api, "STOP")
        refused = await send(api, world, **{"from": "+14155550199"})

    assert_problem(refused, 403, "recipient_opted_out")
    assert [row[1] for row in await opt_out_rows(session_factory)] == [None]


async def test_inbound_messages_are_listed_for_admins_and_their_senders_clients(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    for body in ("Hello", "STOP", "Thanks"):
        await twilio_inbound(api, body)

    listing = await api.get("/v1/inbound", params={"limit": 2}, headers=world.auth(world.admin_key))
    rest = await api.get(
        "/v1/inbound",
        params={"limit": 2, "cursor": listing.json()["next_cursor"]},
        headers=world.auth(world.admin_key),
    )
    stops = await api.get(
        "/v1/inbound", params={"keyword_category": "opt_out"}, headers=world.auth(world.admin_key)
    )
    own = await api.get("/v1/inbound", headers=world.auth())  # shop's sender: all three

    assert [m["body"] for m in listing.json()["data"]] == ["Thanks", "STOP"]
    assert listing.json()["has_more"] is True
    assert [m["body"] for m in rest.json()["data"]] == ["Hello"]
    assert [m["keyword"] for m in stops.json()["data"]] == ["STOP"]
    reply_id = stops.json()["data"][0]["reply_message_id"]
    reply = await api.get(f"/v1/messages/{reply_id}", headers=world.auth(world.admin_key))
    assert reply.json()["body"] == REPLIES["opt_out"]["en"]
    assert [m["body"] for m in own.json()["data"]] == ["Thanks", "STOP", "Hello"]


async def test_a_message_accepted_before_a_stop_is_canceled_not_sent(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    accepted = await send(api, world)
    await twilio_inbound(api, "STOP")
    provider = RecordingProvider(twilio_created)

    await run_worker(provider)

    message = await load(session_factory, uuid.UUID(accepted.json()["id"]))
    assert (message.status, message.error_code) == ("canceled", "recipient_opted_out")
    assert len(provider.requests) == 1  # only the STOP confirmation went out
    assert "Unsubscribed" in provider.requests[0].content.decode().replace("+", " ")


async def test_a_send_racing_a_stop_waits_for_it_and_does_not_slip_through(
    world: World, session_factory: SessionFactory
) -> None:
    message_id = await queued_message(session_factory, world)
    provider = RecordingProvider(twilio_created)

    # A STOP is being recorded: its transaction holds the recipient's lock and has written the
    # opt-out, but not committed yet. The worker must wait, then see it.
    async with session_factory() as stop, stop.begin():
        await lock_recipients(stop, [CUSTOMER])
        stop.add(
            OptOut(
                phone=CUSTOMER,
                sender_id=world.twilio_sender.id,
                action="opt_out",
                source="keyword",
                actor="recipient",
            )
        )
        await stop.flush()
        delivery = asyncio.create_task(
            deliver_message(message_id, session_factory, provider.providers(), POLICY)
        )
        await asyncio.sleep(0.2)
        assert not delivery.done()  # blocked on the lock, not racing past it

    outcome = await delivery
    assert outcome.status is not None and outcome.status.value == "canceled"
    assert provider.requests == []


async def test_twilio_21610_on_send_records_the_opt_out(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await queued_message(session_factory, world)
    provider = RecordingProvider(
        twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
    )

    await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert await opt_out_rows(session_factory) == [
        (CUSTOMER, world.twilio_sender.id, "opt_out", "provider_error", "provider:twilio")
    ]
    assert (await load(session_factory, message_id)).status == "failed"
    assert_problem(await send(api, world), 403, "recipient_opted_out")


async def test_vonage_err_code_9_in_a_receipt_records_the_opt_out(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message_id = await queued_message(
        session_factory,
        world,
        sender=world.vonage_sender,
        status="sent",
        provider_message_id="0A0000000123ABCD1",
    )
    params = vonage_signed(
        {
            "messageId": "0A0000000123ABCD1",
            "status": "failed",
            "err-code": "9",
            "client-ref": str(message_id),
            "msisdn": "14155550123",
            "to": "ACME",
        }
    )

    assert (await api.get("/v1/webhooks/vonage/status", params=params)).status_code == 204

    assert await opt_out_rows(session_factory) == [
        (CUSTOMER, world.vonage_sender.id, "opt_out", "provider_error", "provider:vonage")
    ]


def vonage_part(number: int, text: str, *, reference: str = "77", total: int = 2) -> dict[str, str]:
    return vonage_signed(
        {
            "msisdn": "14155550123",
            "to": "ACME",
            "messageId": f"0D{reference}{number:014d}",
            "text": text,
            "type": "text",
            "concat": "true",
            "concat-ref": reference,
            "concat-total": str(total),
            "concat-part": str(number),
        }
    )


async def inbound_bodies(session_factory: SessionFactory) -> list[str]:
    async with session_factory() as session:
        return list(
            await session.scalars(select(InboundMessage.body).order_by(InboundMessage.created_at))
        )


async def test_parts_arriving_at_the_same_moment_are_assembled(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    responses = await asyncio.gather(
        api.post(VONAGE_INBOUND, data=vonage_part(1, "Hello ")),
        api.post(VONAGE_INBOUND, data=vonage_part(2, "there")),
    )

    assert [response.status_code for response in responses] == [204, 204]
    assert await inbound_bodies(session_factory) == ["Hello there"]


async def test_a_reused_part_reference_starts_a_new_message(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Handsets count references in one byte: the same reference comes back for a later message.
    for number, text in ((1, "First "), (2, "message")):
        await api.post(VONAGE_INBOUND, data=vonage_part(number, text))
    for number, text in ((1, "Second "), (2, "one")):
        params = vonage_part(number, text)
        params = vonage_signed(
            {
                **{k: v for k, v in params.items() if k not in ("sig", "timestamp", "nonce")},
                "messageId": f"0E77{number:014d}",
            }
        )
        await api.post(VONAGE_INBOUND, data=params)

    assert await inbound_bodies(session_factory) == ["First message", "Second one"]


async def test_a_stop_waits_for_a_send_being_claimed_to_that_number(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # The worker's claim holds the number's lock; the STOP must wait for it, not slip past.
    async with session_factory() as claim, claim.begin():
        await lock_recipients(claim, [CUSTOMER])
        stop = another_actor(twilio_inbound(api, "STOP"))  # the webhook, not the worker
        await asyncio.sleep(0.2)
        assert not stop.done()

    assert (await stop).status_code == 200
    assert len(await opt_out_rows(session_factory)) == 1


@pytest.mark.parametrize("kind", ["keyword_reply", "opt_in_confirmation", "regular"])
async def test_replies_queued_before_a_stop_are_canceled_too(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, kind: str
) -> None:
    message_id = await queued_message(session_factory, world, kind=kind)
    await twilio_inbound(api, "STOP")
    provider = RecordingProvider(twilio_created)

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is not None and outcome.status.value == "canceled"
    assert provider.requests == []


async def test_a_first_stop_after_an_api_opt_out_is_still_confirmed_once(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await api.put(f"/v1/opt-outs/{CUSTOMER}", headers=world.auth())

    await twilio_inbound(api, "STOP")
    await twilio_inbound(api, "STOP")

    assert [kind for kind, _, _ in await replies(session_factory)] == ["opt_out_confirmation"]


async def test_a_stop_to_an_opted_out_sender_is_not_confirmed_again_under_service_scope(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(opt_out_scope="sender") as api:
        await twilio_inbound(api, "STOP")  # recorded for this sender, confirmed
    async with app_factory(opt_out_scope="service") as api:
        await twilio_inbound(api, "STOP")  # the sender sees no change: no second confirmation

    assert len(await replies(session_factory)) == 1


@pytest.mark.parametrize("customer", ["+1234567890123456789", "ACME-BANK", "12"])
async def test_a_keyword_from_an_odd_number_is_recorded_but_not_acted_on(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, customer: str
) -> None:
    response = await twilio_inbound(api, "STOP", customer=customer)

    assert response.status_code == 200
    async with session_factory() as session:
        inbound = await session.scalar(select(InboundMessage))
    assert inbound is not None and inbound.from_ == customer and inbound.keyword == "STOP"
    assert await opt_out_rows(session_factory) == []
    assert await replies(session_factory) == []


async def test_impossible_segment_counts_are_not_counts(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    params = vonage_signed(
        {
            "msisdn": "14155550123",
            "to": "ACME",
            "messageId": "0F0000000000001",
            "text": "hi",
            "concat": "true",
            "concat-ref": "9",
            "concat-total": "40000",
            "concat-part": "1",
        }
    )

    response = await api.post(VONAGE_INBOUND, data=params)

    assert response.status_code == 204
    async with session_factory() as session:
        inbound = await session.scalar(select(InboundMessage))
    assert inbound is not None and inbound.body == "hi" and inbound.num_segments is None
