"""Provider health, shared by every worker through Redis: a circuit breaker per provider, and a
pause per provider after it throttled us.

Circuit breaker. Failures that say the provider itself is failing (timeouts, connection errors,
5xx; not 4xx, which are about one message, and not 429, which is about our pace) are counted; a
success resets the count. `CIRCUIT_FAILURE_THRESHOLD` failures within `CIRCUIT_WINDOW_SECONDS`
open the circuit for `CIRCUIT_OPEN_SECONDS`: messages whose sender names a fallback provider go
there, the others wait (deferred, not failed, no attempt counted). When the open period is over
one submission is let through as a probe (half-open): its success closes the circuit, its failure
opens it again. Each transition is one Lua script, so concurrent workers agree.

Pause. A provider that answered "too many requests" (HTTP 429, Twilio 20429, Vonage status 1) is
left alone by every worker until its `Retry-After` (or `THROTTLE_PAUSE_SECONDS`) has passed, so
one throttled submission slows the whole provider instead of each message finding out by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from redis.asyncio import Redis

from app.providers.base import ErrorKind, ProviderError

# `circuit_check(circuit, pause, probe_ms, may_probe)`: the circuit (a hash) and the pause of a
# provider; how long a probe may take (ms); '0' when the caller cannot be the probe (then a due
# probe reads as open, wait 0). Returns {state, wait_ms, pause_ms}: state 0 closed, 1 open
# (wait_ms: until a probe may go), 2 half-open and this caller is the probe. A Lua function, so
# the delivery gate can ask it and reserve slots in one script (app.delivery.dispatch).
CHECK_LUA: Final = """
local function circuit_check(circuit, pause_key, probe_ms, may_probe)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local pause = math.max(redis.call('PTTL', pause_key), 0)
  local opened_until = tonumber(redis.call('HGET', circuit, 'opened_until'))
  if not opened_until then return {0, 0, pause} end
  if now < opened_until then return {1, opened_until - now, pause} end
  local probe_until = tonumber(redis.call('HGET', circuit, 'probe_until')) or 0
  if now < probe_until then return {1, probe_until - now, pause} end
  if may_probe == '0' then return {1, 0, pause} end
  redis.call('HSET', circuit, 'probe_until', now + tonumber(probe_ms))
  return {2, 0, pause}
end
"""
_CHECK: Final = CHECK_LUA + "return circuit_check(KEYS[1], KEYS[2], ARGV[1], ARGV[2])\n"

_RECORD: Final = """
-- KEYS[1]: the circuit (hash). ARGV: failed (1/0), threshold, window (ms), open for (ms).
-- Returns 1 when this call opened the circuit, -1 when it closed it, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failed = ARGV[1] == '1'
local window = tonumber(ARGV[3])
local open_for = tonumber(ARGV[4])
local keep = (window + open_for) * 10
local opened_until = tonumber(redis.call('HGET', KEYS[1], 'opened_until'))
if opened_until and now < opened_until then
  return 0  -- open: a straggler from before it opened changes nothing
end
if not failed then
  if opened_until then
    redis.call('DEL', KEYS[1])  -- the probe succeeded: close
    return -1
  end
  redis.call('HDEL', KEYS[1], 'failures', 'window_start')
  return 0
end
if opened_until then  -- half-open and the probe failed: open again
  redis.call('HSET', KEYS[1], 'opened_until', now + open_for)
  redis.call('HDEL', KEYS[1], 'probe_until')
  redis.call('PEXPIRE', KEYS[1], keep)
  return 1
end
local start = tonumber(redis.call('HGET', KEYS[1], 'window_start'))
local failures = 1
if start and now - start <= window then
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
else
  redis.call('HSET', KEYS[1], 'window_start', now, 'failures', 1)
end
redis.call('PEXPIRE', KEYS[1], keep)
if failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'opened_until', now + open_for)
  redis.call('HDEL', KEYS[1], 'failures', 'window_start', 'probe_until')
  return 1
end
return 0
"""


class CircuitState(StrEnum):
    """Whether a provider may be called."""

    CLOSED = "closed"
    OPEN = "open"
    PROBE = "probe"  # half-open, and this caller makes the one trial submission


@dataclass(frozen=True, slots=True)
class Health:
    """A provider's circuit, how long until it may be tried again, and how long it is paused."""

    state: CircuitState
    open_for: float = 0.0
    paused_for: float = 0.0


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """When a circuit opens and for how long."""

    failure_threshold: int = 5
    window_seconds: float = 30.0
    open_seconds: float = 30.0
    # A probe that has not reported after this long (its worker died) lets another one go.
    probe_timeout_seconds: float = 30.0
    throttle_pause_seconds: float = 1.0


def is_provider_fault(error: ProviderError) -> bool:
    """True for failures that say the provider is down or failing, not that one message or our
    pace was wrong: timeouts, connection errors and 5xx."""
    if error.throttled or error.kind is ErrorKind.PERMANENT:
        return False
    return error.provider_fault


class ProviderHealth:
    """Circuit breakers and pauses of every provider, in Redis."""

    def __init__(self, redis: Redis, policy: CircuitPolicy) -> None:
        self.redis = redis
        self._check = redis.register_script(_CHECK)
        self._record = redis.register_script(_RECORD)
        self.policy = policy

    def keys(self, provider: str) -> list[str]:
        """`circuit_check`'s keys for `provider`: its circuit and its pause."""
        return [self._circuit_key(provider), self._pause_key(provider)]

    @property
    def probe_timeout_ms(self) -> int:
        """`circuit_check`'s `probe_ms`."""
        return int(self.policy.probe_timeout_seconds * 1000)

    @staticmethod
    def health(state: int, wait_ms: int, pause_ms: int) -> Health:
        """What `circuit_check` answered, as a `Health`."""
        return Health(
            state=(CircuitState.CLOSED, CircuitState.OPEN, CircuitState.PROBE)[int(state)],
            open_for=int(wait_ms) / 1000.0,
            paused_for=int(pause_ms) / 1000.0,
        )

    @staticmethod
    def _circuit_key(provider: str) -> str:
        return f"smsgate:circuit:{{{provider}}}"

    @staticmethod
    def _pause_key(provider: str) -> str:
        return f"smsgate:circuit:{{{provider}}}:paused"

    async def check(self, provider: str, *, may_probe: bool = True) -> Health:
        """The provider's state for a submission about to be made (may make the caller the
        half-open probe, unless `may_probe` is false: then a due probe reads as open)."""
        state, wait_ms, pause_ms = await self._check(
            keys=self.keys(provider), args=[self.probe_timeout_ms, "1" if may_probe else "0"]
        )
        return self.health(state, wait_ms, pause_ms)

    async def record(self, provider: str, error: ProviderError | None) -> int:
        """Count a submission's result: 1 when it opened the circuit, -1 when it closed it."""
        failed = error is not None and is_provider_fault(error)
        changed = await self._record(
            keys=[self._circuit_key(provider)],
            args=[
                "1" if failed else "0",
                self.policy.failure_threshold,
                int(self.policy.window_seconds * 1000),
                int(self.policy.open_seconds * 1000),
            ],
        )
        if error is not None and error.throttled:
            await self.pause(provider, error.retry_after or self.policy.throttle_pause_seconds)
        return int(changed)

    async def pause(self, provider: str, seconds: float) -> None:
        """Keep every worker from calling `provider` for `seconds` (it throttled us)."""
        if seconds > 0:
            await self.redis.set(self._pause_key(provider), b"1", px=max(int(seconds * 1000), 1))
