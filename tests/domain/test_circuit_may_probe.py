"""ProviderHealth.check(provider, may_probe=False): the batch path's look at a circuit, which
must never use up the half-open probe."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from app.delivery.circuit import CircuitState, ProviderHealth
from tests.domain.test_circuit import POLICY, SERVER_ERROR, THROTTLED


async def open_twilio(health: ProviderHealth) -> None:
    for _ in range(POLICY.failure_threshold):
        await health.record("twilio", SERVER_ERROR)


async def test_a_due_probe_reads_as_open_and_is_left_for_a_later_check(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    await open_twilio(health)
    await asyncio.sleep(POLICY.open_seconds + 0.05)

    looks = [await health.check("twilio", may_probe=False) for _ in range(3)]
    probe = await health.check("twilio")
    after_probe = await health.check("twilio", may_probe=False)

    assert [(look.state, look.open_for) for look in looks] == [(CircuitState.OPEN, 0.0)] * 3
    assert probe.state is CircuitState.PROBE
    assert after_probe.state is CircuitState.OPEN and after_probe.open_for > 0  # probe is out


async def test_while_open_it_reads_open_with_the_time_left(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    await open_twilio(health)

    look = await health.check("twilio", may_probe=False)

    assert look.state is CircuitState.OPEN and 0 < look.open_for <= POLICY.open_seconds


async def test_closed_and_paused_read_the_same_either_way(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    await health.record("twilio", THROTTLED)

    look = await health.check("twilio", may_probe=False)
    check = await health.check("twilio")

    assert look.state is check.state is CircuitState.CLOSED
    assert look.paused_for > 0 and check.paused_for > 0


async def test_a_look_does_not_close_or_reopen_anything(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    await open_twilio(health)
    await asyncio.sleep(POLICY.open_seconds + 0.05)
    await health.check("twilio", may_probe=False)

    probe = await health.check("twilio")
    closed = await health.record("twilio", None)  # the probe succeeded

    assert probe.state is CircuitState.PROBE and closed == -1
    assert (await health.check("twilio", may_probe=False)).state is CircuitState.CLOSED
