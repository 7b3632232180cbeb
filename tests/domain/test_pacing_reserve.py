"""SenderPacer.reserve: a run of consecutive slots for a batch, counted or taken in one step,
never ahead of a line of ticket holders and never further ahead than the inline wait."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from app.delivery.pacing import MAX_INLINE_WAIT_SECONDS, Reservation, SenderPacer

TOLERANCE = 0.02  # Redis' clock against ours, and the time between two commands


async def test_counting_does_not_take_the_slots_and_taking_does(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    looked = await pacer.reserve(sender, 10.0, 3, consume=False)
    again = await pacer.reserve(sender, 10.0, 3, consume=False)
    taken = await pacer.reserve(sender, 10.0, 3, consume=True)
    after = await pacer.reserve(sender, 10.0, 3, consume=False)

    assert (looked.count, again.count, taken.count) == (3, 3, 3)
    assert looked.first == again.first == taken.first == 0.0  # the looks moved nothing
    assert taken.interval == pytest.approx(0.1)
    # The three slots taken are gone: the next free one is three intervals on.
    assert 0.3 - TOLERANCE <= after.first <= 0.3


async def test_a_look_leaves_the_slot_to_a_single_message(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    await pacer.reserve(sender, 1.0, 5, consume=False)
    single = await pacer.take(sender, uuid.uuid4(), 1.0)

    assert (single.wait, single.queued) == (0.0, False)


async def test_a_single_message_waits_behind_a_reservation(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    taken = await pacer.reserve(sender, 4.0, 3, consume=True)
    single = await pacer.take(sender, uuid.uuid4(), 4.0)

    assert taken.count == 3
    assert single.queued and 0.75 - TOLERANCE <= single.wait <= 0.75


async def test_slots_are_spaced_by_the_interval(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    first = await pacer.reserve(sender, 4.0, 3, consume=True)
    second = await pacer.reserve(sender, 4.0, 2, consume=True)

    assert first.interval == second.interval == 0.25
    assert [first.offset(i) for i in range(first.count)] == [0.0, 0.25, 0.5]
    # The second run begins where the first ended, one interval after its last slot.
    assert 0.75 - TOLERANCE <= second.first <= 0.75
    assert second.offset(1) - second.offset(0) == 0.25


def test_offsets_follow_first_and_interval() -> None:
    reservation = Reservation(count=3, first=0.2, interval=0.5)

    assert [reservation.offset(i) for i in range(3)] == [0.2, 0.7, 1.2]


async def test_a_line_of_ticket_holders_gets_every_slot_until_it_has_passed(
    redis: Redis,
) -> None:
    pacer = SenderPacer(redis)
    sender, holder = uuid.uuid4(), uuid.uuid4()
    await pacer.take(sender, uuid.uuid4(), 5.0)  # one went; the next slot is 0.2 s away
    ticket = await pacer.take(sender, holder, 5.0, consume=False)  # a backlog: a line forms
    assert ticket.queued

    counted = await pacer.reserve(sender, 5.0, 3, consume=False)
    taken = await pacer.reserve(sender, 5.0, 3, consume=True)
    await asyncio.sleep(ticket.wait + 0.01)
    holder_turn = await pacer.take(sender, holder, 5.0)  # its slot was not taken meanwhile
    afterwards = await pacer.reserve(sender, 5.0, 3, consume=False)

    assert (counted.count, taken.count) == (0, 0)
    assert (holder_turn.wait, holder_turn.queued) == (0.0, False)
    assert afterwards.count == 3  # the line has passed: batches go again


async def test_no_slot_is_further_ahead_than_the_inline_wait(redis: Redis) -> None:
    pacer = SenderPacer(redis, max_inline_wait=1.0)
    sender = uuid.uuid4()

    taken = await pacer.reserve(sender, 2.0, 10, consume=True)
    more = await pacer.reserve(sender, 2.0, 10, consume=True)

    assert taken.count == 3  # slots at 0, 0.5 and 1.0 s; the fourth (1.5 s) is too far
    assert taken.offset(taken.count - 1) <= 1.0
    assert more.count == 0  # the next free slot (1.5 s) is beyond the inline wait
    # ... and taking none moved nothing: a single message still finds that slot.
    single = await pacer.take(sender, uuid.uuid4(), 2.0)
    assert single.queued and 1.5 - TOLERANCE <= single.wait <= 1.5


async def test_the_default_inline_wait_bounds_a_slow_senders_run(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    taken = await pacer.reserve(sender, 1.0, 10, consume=True)

    assert taken.count == int(MAX_INLINE_WAIT_SECONDS) + 1
    assert taken.offset(taken.count - 1) <= MAX_INLINE_WAIT_SECONDS


async def test_fewer_wanted_than_fit_takes_only_those(redis: Redis) -> None:
    pacer = SenderPacer(redis)
    sender = uuid.uuid4()

    taken = await pacer.reserve(sender, 100.0, 2, consume=True)
    next_free = await pacer.reserve(sender, 100.0, 1, consume=False)

    assert taken.count == 2
    assert 0.02 - TOLERANCE <= next_free.first <= 0.02
