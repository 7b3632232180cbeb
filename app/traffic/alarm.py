"""The pumping alarm's event: `traffic.pumping_suspected`, written after the messages are stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from app.db.session import SessionFactory
from app.events.outbox import PumpingData, emit_pumping_suspected, scheduled
from app.kernel.settings import PumpingSettings, Settings
from app.traffic.velocity import PumpingAlarm, RangeReading, VelocityCheck
from app.worker.queue import Queue, enqueue_events

AlarmHook = Callable[[PumpingAlarm, list[RangeReading]], Awaitable[None]]


def event_writer(
    session_factory: SessionFactory, queue: Queue, settings: PumpingSettings
) -> AlarmHook:
    """The hook `VelocityCheck` calls for the ranges that fired: one event per range, in a
    transaction of its own (the messages' is over), enqueued after its commit."""

    async def write(alarm: PumpingAlarm, fresh: list[RangeReading]) -> None:
        detected_at = datetime.now(UTC)
        async with session_factory.begin() as session:
            for reading in fresh:
                data = PumpingData(
                    client_id=alarm.client_id,
                    range=reading.range,
                    distinct_numbers=reading.distinct,
                    usual=round(reading.usual, 2),
                    threshold=round(reading.threshold, 2),
                    window_seconds=settings.window_seconds,
                    action=alarm.action,
                    detected_at=detected_at,
                )
                await emit_pumping_suspected(session, data)
        events = scheduled(session)
        if events:
            await enqueue_events(queue, events)

    return write


def pumping_check(
    queue: Queue, session_factory: SessionFactory, settings: Settings
) -> VelocityCheck:
    """The accept path's pumping alarm, on the queue's Redis (a client whose action is `off`,
    the service's or its own, costs no Redis call)."""
    hook = event_writer(session_factory, queue, settings.pumping)
    return VelocityCheck(queue, settings.pumping, on_alarm=hook)
