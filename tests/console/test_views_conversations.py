"""The conversation view: outbound and inbound interleaved, keywords and replies marked."""

from __future__ import annotations

import uuid

import httpx

from app.console.conversations import Direction, conversation
from app.db.session import SessionFactory
from app.inbound.service import receive_inbound
from app.providers.base import InboundSms
from tests.conftest import World

PHONE = "+14155550123"


async def _send(api: httpx.AsyncClient, world: World, body: str, sender: str) -> uuid.UUID:
    response = await api.post(
        "/v1/messages", json={"to": PHONE, "from": sender, "body": body}, headers=world.auth()
    )
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["id"])


async def _inbound(sessions: SessionFactory, body: str, to: str) -> uuid.UUID | None:
    async with sessions.begin() as session:
        outcome = await receive_inbound(
            session,
            "twilio",
            InboundSms(provider_message_id=f"SM{uuid.uuid4().hex}", from_=PHONE, to=to, body=body),
            default_region="US",
            opt_out_scope="sender",
        )
    return outcome.inbound_id


async def test_turns_interleave_with_keywords_and_replies_marked(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    address = world.twilio_sender.address
    first = await _send(api, world, "Your order shipped", address)
    stop = await _inbound(session_factory, "stop", address)
    hello = await _inbound(session_factory, "who is this?", address)
    await _send(api, world, "From another sender", world.fake_sender.address)

    async with session_factory() as session:
        talk = await conversation(session, PHONE, world.twilio_sender.id)

    kinds = [(turn.direction, turn.kind) for turn in talk.turns]
    assert kinds == [
        (Direction.OUTBOUND, "regular"),
        (Direction.INBOUND, "inbound"),
        (Direction.OUTBOUND, "opt_out_confirmation"),
        (Direction.INBOUND, "inbound"),
    ]
    sent, stop_turn, reply, question = talk.turns
    assert sent.id == first and sent.body is None  # a client's body stays hidden
    assert not sent.is_reply
    assert stop_turn.id == stop
    assert (stop_turn.keyword, stop_turn.keyword_category) == ("STOP", "opt_out")
    assert stop_turn.reply_id == reply.id
    assert reply.is_reply and reply.body is not None and "Unsubscribed" in reply.body
    assert question.id == hello and question.keyword is None and question.body is None
    assert talk.older is None

    async with session_factory() as session:
        shown = await conversation(session, PHONE, world.twilio_sender.id, show_bodies=True)
    assert [turn.body for turn in shown.turns][0::3] == ["Your order shipped", "who is this?"]


async def test_pages_go_back_in_time_without_gaps(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    address = world.twilio_sender.address
    for n in range(3):
        await _send(api, world, f"message {n}", address)
        await _inbound(session_factory, f"answer {n}", address)

    seen: list[uuid.UUID] = []
    before = None
    async with session_factory() as session:
        for _ in range(4):
            page = await conversation(
                session, PHONE, world.twilio_sender.id, before=before, limit=4
            )
            seen = [turn.id for turn in page.turns] + seen
            before = page.older
            if before is None:
                break
        everything = await conversation(session, PHONE, world.twilio_sender.id, limit=50)
    assert seen == [turn.id for turn in everything.turns]
    assert len(seen) == 6
    assert [turn.direction for turn in everything.turns] == [
        Direction.OUTBOUND,
        Direction.INBOUND,
    ] * 3


async def test_other_numbers_and_senders_are_not_in_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await _send(api, world, "hi", world.fake_sender.address)
    await _inbound(session_factory, "HELP", world.fake_sender.address)
    async with session_factory() as session:
        assert (await conversation(session, PHONE, world.twilio_sender.id)).turns == []
        assert (await conversation(session, "+14155550999", world.fake_sender.id)).turns == []
        assert len((await conversation(session, PHONE, world.fake_sender.id)).turns) == 3
