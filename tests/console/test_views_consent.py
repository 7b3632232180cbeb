"""The consent view and an operator's opt-out and opt-in, through app.consent's rules."""

from __future__ import annotations

import uuid

import pytest

from app.consent.optouts import OptAction, is_opted_out
from app.console.consent_view import consent_view, record_operator_change
from app.db.session import SessionFactory
from app.kernel.errors import NotFound, ValidationFailed
from tests.conftest import World

PHONE = "+14155550123"


async def test_operator_opt_out_and_back_in_with_reason(
    world: World, session_factory: SessionFactory
) -> None:
    sender = world.twilio_sender.id
    async with session_factory.begin() as session:
        result = await record_operator_change(
            session,
            phone=PHONE,
            sender_id=sender,
            action=OptAction.OPT_OUT,
            reason="customer called support",
            key_name="ops",
        )
    assert result.changed and result.recorded
    async with session_factory() as session:
        view = await consent_view(session, PHONE)
        assert await is_opted_out(session, PHONE, sender)
    states = {state.sender_id: state.opted_out for state in view.senders}
    assert states == {
        world.twilio_sender.id: True,
        world.vonage_sender.id: False,
        world.fake_sender.id: False,
    }
    assert not view.service_wide_opted_out
    (row,) = view.history
    assert (row.action, row.source, row.actor, row.detail) == (
        "opt_out",
        "api",
        "operator:ops",
        "customer called support",
    )
    assert row.sender_address == world.twilio_sender.address

    async with session_factory.begin() as session:
        back = await record_operator_change(
            session,
            phone=PHONE,
            sender_id=sender,
            action=OptAction.OPT_IN,
            reason="asked to resubscribe",
            key_name="ops",
        )
        again = await record_operator_change(
            session,
            phone=PHONE,
            sender_id=sender,
            action=OptAction.OPT_IN,
            reason="twice",
            key_name="ops",
        )
    assert back.changed and not again.recorded  # a change that alters nothing adds no row
    async with session_factory() as session:
        view = await consent_view(session, PHONE)
        assert not await is_opted_out(session, PHONE, sender)
    assert [row.action for row in view.history] == ["opt_in", "opt_out"]
    assert not any(state.opted_out for state in view.senders)


async def test_service_wide_opt_out_shows_for_every_sender(
    world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        await record_operator_change(
            session,
            phone=PHONE,
            sender_id=None,
            action=OptAction.OPT_OUT,
            reason="legal request",
            key_name="ops",
        )
    async with session_factory() as session:
        view = await consent_view(session, PHONE, history_limit=1)
    assert view.service_wide_opted_out
    assert all(state.opted_out for state in view.senders)
    assert view.history[0].sender_id is None and view.older is None


@pytest.mark.parametrize("reason", ["", "   ", "x" * 501, "a\x00b"])
async def test_a_reason_is_required_and_bounded(
    world: World, session_factory: SessionFactory, reason: str
) -> None:
    async with session_factory.begin() as session:
        with pytest.raises(ValidationFailed) as raised:
            await record_operator_change(
                session,
                phone=PHONE,
                sender_id=world.twilio_sender.id,
                action=OptAction.OPT_OUT,
                reason=reason,
                key_name="ops",
            )
    assert raised.value.errors is not None
    assert raised.value.errors[0].field == "reason"
    async with session_factory() as session:
        assert (await consent_view(session, PHONE)).history == []


async def test_an_unknown_sender_is_not_found(
    world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        with pytest.raises(NotFound):
            await record_operator_change(
                session,
                phone=PHONE,
                sender_id=uuid.uuid4(),
                action=OptAction.OPT_OUT,
                reason="typo",
                key_name="ops",
            )


async def test_history_comes_in_cursor_pages(world: World, session_factory: SessionFactory) -> None:
    for n in range(4):
        async with session_factory.begin() as session:
            await record_operator_change(
                session,
                phone=PHONE,
                sender_id=world.twilio_sender.id,
                action=OptAction.OPT_OUT if n % 2 == 0 else OptAction.OPT_IN,
                reason=f"change {n}",
                key_name="ops",
            )
    async with session_factory() as session:
        view = await consent_view(session, PHONE, history_limit=3)
        rest = await consent_view(session, PHONE, history_limit=3, before=view.older)
    assert [row.detail for row in view.history] == ["change 3", "change 2", "change 1"]
    assert view.older is not None  # found by review: the rest was out of reach
    assert [row.detail for row in rest.history] == ["change 0"] and rest.older is None
