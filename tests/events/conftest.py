"""Fixtures for the events tests: receivers started on 127.0.0.1 and stopped afterwards."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.events.support import Answer, Receiver, respond

StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receivers() -> AsyncIterator[StartReceiver]:
    """`await receivers(answer, answer, default=...)` starts a receiver with scripted answers."""
    started: list[Receiver] = []

    async def start(*answers: Answer, default: Answer | None = None) -> Receiver:
        receiver = Receiver(answers=deque(answers), default=default or respond())
        started.append(await receiver.start())
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()
