"""Sender pacing (GCRA in Redis): spacing across workers, tickets, deferrals, default rates."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pytest
from redis.asyncio import Redis

from app.delivery.pacing import SenderPacer
from app.kernel.metrics import RATE_LIMIT_DEFERRALS
from app.kernel.sender_rates import (
    ALPHANUMERIC_RATE,
    LONG_CODE_RATE,
    SHORT_CODE_RATE,
    TOLL_FREE_RATE,
    default_rate,
)
from tests.conftest import TEST_REDIS_URL


def deferrals() -> float:
    value: float = RATE_LIMIT_DEFERRALS.labels(provider="twilio", reason="sender_rate")._value.get()
    return value


@pytest.mark.parametrize(
    ("kind", "address", "rate"),
    [
        ("long_code", "+14155550100", LONG_CODE_RATE),
        ("long_code", "+18005550100", TOLL_FREE_RATE),
        ("long_code", "+18885550100", TOLL_FREE_RATE),
        ("short_code", "12345", SHORT_CODE_RATE),
        ("alphanumeric", "ACME", ALPHANUMERIC_RATE),
    ],
)
def test_default_rates_follow_the_kind(kind: str, address: str, rate: float) -> None:
    assert default_rate(kind, address) == rate


async def test_one_message_goes_and_the_next_waits_one_interval(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    first = await pacer.take(sender, uuid.uuid4(), rate=2.0)
    second = await pacer.take(sender, uuid.uuid4(), rate=2.0)
    third = await pacer.take(sender, uuid.uuid4(), rate=2.0)

    assert (first.wait, first.queued) == (0.0, False)
    assert second.queued and 0.45 <= second.wait <= 0.5
    # Each waiting message gets a slot of its own, behind those already waiting.
    assert third.queued and 0.95 <= third.wait <= 1.0


async def test_a_ticket_holder_keeps_its_place_and_goes_at_its_slot(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender, early, late = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await pacer.take(sender, uuid.uuid4(), rate=10.0)
    slot = await pacer.take(sender, early, rate=10.0)

    again = await pacer.take(sender, early, rate=10.0)  # asks again before its slot
    newcomer = await pacer.take(sender, late, rate=10.0)
    await asyncio.sleep(slot.wait + 0.01)
    admitted = await pacer.take(sender, early, rate=10.0)

    assert not again.queued and 0 < again.wait <= slot.wait  # the same ticket, not a new one
    assert newcomer.queued and newcomer.wait > again.wait  # behind the ticket holder
    assert admitted.wait == 0.0


async def test_senders_are_paced_independently(redis: Redis) -> None:
    pacer = SenderPacer(redis)

    results = [await pacer.take(uuid.uuid4(), uuid.uuid4(), rate=1.0) for _ in range(5)]

    assert all(result.wait == 0.0 for result in results)


async def test_workers_together_never_exceed_the_rate(redis: Redis) -> None:
    """Three "workers" (own Redis clients) admitting 15 messages of one sender at 20/s."""
    sender = uuid.uuid4()
    rate = 20.0
    clients = [Redis.from_url(TEST_REDIS_URL) for _ in range(3)]
    admitted: list[float] = []
    before = deferrals()

    async def send_one(pacer: SenderPacer) -> None:
        wait = await pacer.admit(sender, uuid.uuid4(), rate, provider="twilio")
        assert wait == 0.0  # 15 messages at 20/s: every wait is short enough to sleep
        admitted.append(time.monotonic())

    try:
        pacers = [SenderPacer(client) for client in clients]
        await asyncio.gather(*(send_one(pacers[i % 3]) for i in range(15)))
    finally:
        for client in clients:
            await client.aclose()

    admitted.sort()
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    # Spaced by 1/rate as Redis measured it; our clock sees the replies a little jittered.
    assert min(gaps) >= 1 / rate - 0.015
    assert admitted[-1] - admitted[0] >= 14 / rate - 0.02
    assert deferrals() - before == 14  # every message but the first had to wait, once


async def test_a_long_wait_is_deferred_not_slept(redis: Redis) -> None:
    pacer = SenderPacer(redis, max_inline_wait=0.2)
    sender = uuid.uuid4()
    await pacer.take(sender, uuid.uuid4(), rate=1.0)

    started = time.monotonic()
    defer = await pacer.admit(sender, uuid.uuid4(), rate=1.0, provider="twilio")

    assert time.monotonic() - started < 0.1
    assert 0 < defer <= 1.0


async def test_looking_for_a_place_in_line_does_not_take_the_slot(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender, message = uuid.uuid4(), uuid.uuid4()

    look = await pacer.take(sender, message, rate=1.0, consume=False)
    looked = look.wait
    taken = await pacer.admit(sender, message, rate=1.0, provider="twilio")
    other = await pacer.take(sender, uuid.uuid4(), rate=1.0, consume=False)

    assert (looked, taken) == (0.0, 0.0)  # its turn; then it takes the slot
    assert other.queued and 0.9 <= other.wait <= 1.0  # the slot is gone: the next waits
