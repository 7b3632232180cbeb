"""The senders view: replies per language, what each costs, what is missing; editing a reply."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from app.console.senders_view import reply_cost, sender_detail, sender_summaries, set_reply
from app.db.models import Sender
from app.db.session import SessionFactory
from app.kernel.errors import NotFound, ValidationFailed
from app.senders.keywords import KeywordConfig
from app.senders.service import update_sender
from tests.conftest import World
from tests.netguard import another_actor


def test_reply_cost_counts_as_a_send_would() -> None:
    plain = reply_cost("a" * 160)
    assert (plain.encoding, plain.segments, plain.units) == ("GSM-7", 1, 160)
    assert reply_cost("a" * 161).segments == 2
    escaped = reply_cost("{" * 80)  # two septets each
    assert (escaped.units, escaped.segments) == (160, 1)
    accented = reply_cost("Répondez ARRÊT")
    assert (accented.encoding, accented.segments) == ("UCS-2", 1)
    assert accented.non_gsm_characters == ("Ê",)
    assert reply_cost("").segments == 0


async def _bare_sender(sessions: SessionFactory) -> uuid.UUID:
    async with sessions.begin() as session:
        sender = Sender(
            id=uuid.uuid4(),
            address="+14155550177",
            kind="long_code",
            provider="fake",
            keywords=KeywordConfig().model_dump(mode="json"),
        )
        session.add(sender)
    return sender.id


async def test_missing_replies_shrink_as_they_are_set(session_factory: SessionFactory) -> None:
    sender_id = await _bare_sender(session_factory)
    async with session_factory() as session:
        (summary,) = await sender_summaries(session, accept_defaults=False)
        lenient = await sender_summaries(session, accept_defaults=True)
    assert summary.missing == ["help/en", "help/fr", "opt_out/en", "opt_out/fr"]
    assert lenient[0].missing == []

    async with session_factory.begin() as session:
        await set_reply(
            session, sender_id, category="opt_out", language="fr", reply="Désabonné. ARRET."
        )
    async with session_factory() as session:
        detail = await sender_detail(session, sender_id, accept_defaults=False)
    assert detail.summary.missing == ["help/en", "help/fr", "opt_out/en"]
    opt_out = next(view for view in detail.categories if view.category == "opt_out")
    french = next(view for view in opt_out.languages if view.language == "fr")
    assert french.reply == "Désabonné. ARRET."
    assert "ARRET" in french.keywords
    assert french.cost is not None and french.cost.encoding == "GSM-7"  # é is in GSM-7
    english = next(view for view in opt_out.languages if view.language == "en")
    assert english.reply is None and english.default_reply is not None
    assert english.cost is not None  # of the built-in reply, which is what would go out

    async with session_factory.begin() as session:
        await set_reply(session, sender_id, category="opt_out", language="fr", reply="  ")
    async with session_factory() as session:
        detail = await sender_detail(session, sender_id, accept_defaults=False)
    assert "opt_out/fr" in detail.summary.missing


@pytest.mark.parametrize(
    ("category", "language", "reply", "field"),
    [
        ("custom", "en", "hi", "category"),
        ("opt_out", "EN", "hi", "language"),
        ("opt_out", "english", "hi", "language"),
        ("help", "en", "x" * 1601, "reply"),
        ("help", "en", "nul\x00", "reply"),
    ],
)
async def test_a_bad_reply_is_refused_naming_the_field(
    session_factory: SessionFactory, category: str, language: str, reply: str, field: str
) -> None:
    sender_id = await _bare_sender(session_factory)
    async with session_factory.begin() as session:
        with pytest.raises(ValidationFailed) as raised:
            await set_reply(session, sender_id, category=category, language=language, reply=reply)
    assert raised.value.errors is not None
    assert raised.value.errors[0].field == field
    async with session_factory() as session:
        detail = await sender_detail(session, sender_id, accept_defaults=False)
    assert all(lang.reply is None for view in detail.categories for lang in view.languages)


async def test_an_unknown_sender_is_not_found(session_factory: SessionFactory) -> None:
    async with session_factory() as session:
        with pytest.raises(NotFound):
            await sender_detail(session, uuid.uuid4(), accept_defaults=False)


async def test_two_operators_saving_replies_in_two_languages_keep_both(
    world: World, session_factory: SessionFactory
) -> None:
    """Found by review: `set_reply` read the whole keyword config, changed one reply and wrote
    it back without locking the row, so a concurrent save of another language was lost."""
    sender_id = world.fake_sender.id
    first = session_factory()
    await first.begin()
    await set_reply(first, sender_id, category="help", language="es", reply="Ayuda: responda STOP")

    async def second() -> None:
        async with session_factory.begin() as session:
            await set_reply(session, sender_id, category="help", language="fr", reply="Aide: STOP")

    other = asyncio.create_task(second())
    await asyncio.sleep(0.3)
    assert not other.done()  # waiting on the row the first save holds
    await first.commit()
    await first.close()
    await other
    async with session_factory() as session:
        sender = await session.get(Sender, sender_id)
        assert sender is not None
        replies = sender.keywords["help"]["replies"]
    assert (replies.get("es"), replies.get("fr")) == ("Ayuda: responda STOP", "Aide: STOP")


async def test_the_apis_sender_update_takes_the_same_row_lock(
    world: World, session_factory: SessionFactory
) -> None:
    """One rule for every change of a sender: its row is locked before it is read."""
    sender_id = world.fake_sender.id
    first = session_factory()
    await first.begin()
    await set_reply(first, sender_id, category="help", language="es", reply="Ayuda: responda STOP")

    async def describe() -> None:
        async with session_factory.begin() as session:
            await update_sender(session, sender_id, provider=None, description="renamed")

    other = asyncio.create_task(describe())
    await asyncio.sleep(0.3)
    assert not other.done()
    await first.commit()
    await first.close()
    await other
    async with session_factory() as session:
        sender = await session.get(Sender, sender_id)
        assert sender is not None
    assert sender.description == "renamed"
    assert sender.keywords["help"]["replies"]["es"] == "Ayuda: responda STOP"


async def test_a_senders_row_lock_does_not_hold_up_its_sends(
    world: World, session_factory: SessionFactory, api: httpx.AsyncClient
) -> None:
    """The lock a change of a sender takes is `FOR NO KEY UPDATE`: a message being stored
    from that sender meanwhile (its foreign key takes a key-share lock) does not wait for it."""
    sender_id = world.fake_sender.id
    editing = session_factory()
    await editing.begin()
    try:
        await set_reply(editing, sender_id, category="help", language="es", reply="Ayuda")
        message = {"to": "+14155550123", "from": world.fake_sender.address, "body": "Hi"}
        # The send is another process's: not inside this test's open transaction.
        send = another_actor(api.post("/v1/messages", json=message, headers=world.auth()))
        response = await asyncio.wait_for(send, 5)
        assert response.status_code == 202, response.text
    finally:
        await editing.rollback()
        await editing.close()
