"""GET /v1/messages/{id} shows every decision about a message, not only its status changes: an
unknown outcome, each reconciliation lookup and its answer (repeats counted in one note), and
what finally settled it."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, update

from app.db.models import Message
from app.db.session import SessionFactory
from app.delivery.pipeline import deliver_message
from app.delivery.reconcile import Decision, reconcile_message
from tests.conftest import World
from tests.domain.test_delivery import POLICY, RecordingProvider, queued_message, raising
from tests.domain.test_reconcile import FOUND_SID, GIVE_UP, STALE, listed, twilio_listing


async def read(api: httpx.AsyncClient, world: World, message_id: uuid.UUID) -> dict[str, Any]:
    response = await api.get(f"/v1/messages/{message_id}", headers=world.auth())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def make_stale(session_factory: SessionFactory, message_id: uuid.UUID) -> None:
    """As if the claim were a minute old (older than any job could run)."""
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(claimed_at=func.now() - timedelta(minutes=1))
        )


async def test_an_unknown_outcome_and_its_reconciliation_are_in_the_message_notes(
    api: httpx.AsyncClient, session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)
    timing_out = RecordingProvider(raising(httpx.ReadTimeout))
    await deliver_message(message_id, session_factory, timing_out.providers(), POLICY)

    after_timeout = await read(api, world, message_id)

    assert after_timeout["status"] == "sending"
    assert [step["status"] for step in after_timeout["history"]] == ["sending"]
    (unknown,) = after_timeout["notes"]
    assert unknown["status"] is None and unknown["source"] == "worker"
    assert unknown["detail"].startswith("outcome unknown: ")

    # Twilio's lookup fails twice (an outage): two asks, one note that counts them.
    down = RecordingProvider(lambda r: httpx.Response(503, json={"code": 20503}))
    await make_stale(session_factory, message_id)
    for _ in range(2):
        result = await reconcile_message(
            message_id,
            session_factory,
            down.providers(),
            POLICY,
            older_than=STALE,
            give_up_after=GIVE_UP,
        )
        assert result.decision is Decision.LATER

    waiting = await read(api, world, message_id)

    assert [note["source"] for note in waiting["notes"]] == ["worker", "reconcile"]
    asked = waiting["notes"][1]["detail"]
    assert asked.startswith("outcome of attempt 1 still unknown: twilio could not be asked (")
    assert "looking again in 15s (2 times since " in asked

    # Then Twilio answers that it has the message: settled, and the answer is noted.
    found = twilio_listing(listed())
    result = await reconcile_message(
        message_id,
        session_factory,
        found.providers(),
        POLICY,
        older_than=STALE,
        give_up_after=GIVE_UP,
    )
    settled = await read(api, world, message_id)

    assert result.decision is Decision.SETTLED
    assert [step["status"] for step in settled["history"]] == ["sending", "sent"]
    assert settled["notes"][-1]["source"] == "reconcile"
    assert settled["notes"][-1]["detail"] == f"attempt 1 found at twilio as {FOUND_SID} (sent)"
    assert len(settled["notes"]) == 3
