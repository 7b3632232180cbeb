"""A provider reporting that the recipient opted out records one opt-out, however often it says
so (providers repeat callbacks; issue 13, item 9)."""

from __future__ import annotations

from sqlalchemy import select

from app.consent.optouts import OptAction, OptChange, OptSource, record_change
from app.db.models import OptOut
from app.db.session import SessionFactory
from app.delivery.transitions import record_status_report
from app.kernel.status import MessageStatus
from app.providers.base import StatusReport
from tests.conftest import World
from tests.domain.test_batch_delivery import fresh, number


def unsubscribed(message_id: object, sid: str) -> StatusReport:
    """Twilio's callback for a message to a recipient who replied STOP at Twilio."""
    return StatusReport(
        provider_message_id=sid,
        provider_status="undelivered",
        status=MessageStatus.FAILED,
        message_id=message_id,  # type: ignore[arg-type]
        error_code="21610",
        error_message="Attempt to send to unsubscribed recipient",
        recipient_opted_out=True,
    )


async def history(session_factory: SessionFactory) -> list[tuple[str, str, str]]:
    async with session_factory() as session:
        rows = await session.execute(
            select(OptOut.phone, OptOut.action, OptOut.source).order_by(OptOut.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def test_a_repeated_opt_out_callback_records_one_history_row(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await fresh(
        session_factory, world, number(1), status="sent", attempts=1, provider_message_id="SM1"
    )

    for _ in range(3):
        matched, _events = await record_status_report(
            session_factory, "twilio", unsubscribed(message_id, "SM1")
        )
        assert matched

    assert await history(session_factory) == [(number(1), "opt_out", "provider_error")]


async def test_an_opt_out_report_after_an_opt_in_is_recorded_again(
    session_factory: SessionFactory, world: World
) -> None:
    first = await fresh(
        session_factory, world, number(1), status="sent", attempts=1, provider_message_id="SM1"
    )
    await record_status_report(session_factory, "twilio", unsubscribed(first, "SM1"))
    async with session_factory.begin() as session:
        await record_change(
            session,
            OptChange(number(1), None, OptAction.OPT_IN, OptSource.API, "client:operator"),
        )
    second = await fresh(
        session_factory, world, number(1), status="sent", attempts=1, provider_message_id="SM2"
    )

    await record_status_report(session_factory, "twilio", unsubscribed(second, "SM2"))

    assert await history(session_factory) == [
        (number(1), "opt_out", "provider_error"),
        (number(1), "opt_in", "api"),
        (number(1), "opt_out", "provider_error"),
    ]
