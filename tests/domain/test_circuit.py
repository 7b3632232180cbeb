"""The per-provider circuit breaker and pause, in Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from app.delivery.circuit import CircuitPolicy, CircuitState, ProviderHealth, is_provider_fault
from app.providers.base import ErrorKind, ProviderError

POLICY = CircuitPolicy(
    failure_threshold=3, window_seconds=5.0, open_seconds=0.3, probe_timeout_seconds=0.5
)
TIMEOUT = ProviderError(ErrorKind.UNKNOWN_OUTCOME, "read timeout", provider_fault=True)
SERVER_ERROR = ProviderError(ErrorKind.RETRYABLE, "HTTP 500", code="http_500", provider_fault=True)
INVALID_NUMBER = ProviderError(ErrorKind.PERMANENT, "bad To", code="21211")
THROTTLED = ProviderError(
    ErrorKind.RETRYABLE, "slow down", code="http_429", throttled=True, retry_after=0.4
)


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (TIMEOUT, True),
        (SERVER_ERROR, True),
        (ProviderError(ErrorKind.RETRYABLE, "refused", provider_fault=True), True),
        (INVALID_NUMBER, False),
        (THROTTLED, False),
        (ProviderError(ErrorKind.RETRYABLE, "pool timeout"), False),  # ours, not theirs
    ],
)
def test_only_provider_faults_count(error: ProviderError, counts: bool) -> None:
    assert is_provider_fault(error) is counts


async def test_opens_after_the_threshold_and_closes_after_a_successful_probe(
    redis: Redis,
) -> None:
    health = ProviderHealth(redis, POLICY)
    assert (await health.check("twilio")).state is CircuitState.CLOSED

    changes = [await health.record("twilio", SERVER_ERROR) for _ in range(3)]

    assert changes == [0, 0, 1]
    opened = await health.check("twilio")
    assert opened.state is CircuitState.OPEN and 0 < opened.open_for <= 0.3
    assert (await health.check("vonage")).state is CircuitState.CLOSED  # per provider
    await asyncio.sleep(0.35)
    probe = await health.check("twilio")
    others = await health.check("twilio")  # while the probe is out, the rest wait
    assert (probe.state, others.state) == (CircuitState.PROBE, CircuitState.OPEN)
    assert await health.record("twilio", None) == -1
    assert (await health.check("twilio")).state is CircuitState.CLOSED


async def test_a_failed_probe_opens_it_again(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    for _ in range(3):
        await health.record("twilio", TIMEOUT)
    await asyncio.sleep(0.35)
    assert (await health.check("twilio")).state is CircuitState.PROBE

    assert await health.record("twilio", TIMEOUT) == 1

    assert (await health.check("twilio")).state is CircuitState.OPEN


async def test_a_probe_that_never_reports_lets_another_one_go(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)
    for _ in range(3):
        await health.record("twilio", TIMEOUT)
    await asyncio.sleep(0.35)
    assert (await health.check("twilio")).state is CircuitState.PROBE

    await asyncio.sleep(0.55)  # its worker died

    assert (await health.check("twilio")).state is CircuitState.PROBE


async def test_4xx_and_successes_do_not_open_it(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)

    for _ in range(2):
        await health.record("twilio", SERVER_ERROR)
    await health.record("twilio", None)  # a success resets the count
    for _ in range(2):
        await health.record("twilio", SERVER_ERROR)
    for _ in range(5):
        await health.record("twilio", INVALID_NUMBER)

    assert (await health.check("twilio")).state is CircuitState.CLOSED


async def test_a_throttled_answer_pauses_the_whole_provider(redis: Redis) -> None:
    health = ProviderHealth(redis, POLICY)

    await health.record("twilio", THROTTLED)

    paused = await health.check("twilio")
    assert paused.state is CircuitState.CLOSED and 0.3 < paused.paused_for <= 0.4
    assert (await health.check("vonage")).paused_for == 0
