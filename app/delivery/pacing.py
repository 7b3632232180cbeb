"""Pacing: each sender submits at most `rate_per_second` messages a second, across every worker.

Carriers and providers cap how fast one sender may send (a US long code about 1 message a second,
a toll-free number 3, a short code 100); going faster gets messages queued for hours, throttled or
filtered. The limit is kept in Redis, so it holds for all worker processes together, as a GCRA
(generic cell rate algorithm: a "theoretical arrival time" per sender, advanced by 1/rate per
admitted message) evaluated in one Lua script, so concurrent workers never both take a slot.

A message that may not go now is not refused and not counted as an attempt: it gets a ticket, a
place in its sender's line (the next free slot after everyone already waiting), and waits for it:
in the job when the slot is near, else deferred on the queue until just before it. Tickets spread
the waiting messages over distinct slots, so a backlog of N messages wakes N times, not N^2 times
(as it would if every waiting message retried against the same slot). The slot is re-checked
when the ticket is used, so a late or dead ticket holder never lets the rate be exceeded; tickets
of messages that never come back expire with the line.

Slots are taken after the claim (app.delivery.dispatch): a job takes a short run of consecutive
slots in one step (`reserve`), and a message beyond it looks for its place in line (`take`
without consuming) and takes its slot immediately before its provider call (`admit`). So the
spacing holds at the provider even when the claim is slow (a PostgreSQL stall would otherwise
let messages admitted meanwhile reach the provider all at once).

No burst allowance: admissions are spaced at least 1/rate apart, which is what carriers measure.
If Redis loses the state (a restart without persistence), a sender can go early, once, by what
is left of a run and one message.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Final

from redis.asyncio import Redis

from app.kernel.metrics import RATE_LIMIT_DEFERRALS

# How long a job may wait for its slot itself; a longer wait is deferred on the queue, to come
# back `DEFER_LEAD_SECONDS` before the slot (arq polls for due jobs every half second).
MAX_INLINE_WAIT_SECONDS: Final = 2.0
DEFER_LEAD_SECONDS: Final = 1.0
# Bounds the loop in `SenderPacer.admit` (each round waits at least a little).
MAX_ROUNDS: Final = 20
# A line (and its tickets) is kept this long after its last slot, then forgotten.
LINE_TTL_MS: Final = 60_000

_GCRA: Final = """
-- KEYS[1]: the sender's theoretical arrival time (TAT, ms); KEYS[2]: the last slot handed out
-- (ms); KEYS[3]: tickets, message id -> slot (ms). ARGV[1]: emission interval (ms, 1000/rate);
-- ARGV[2]: the message id; ARGV[3]: how long a line is kept (ms); ARGV[4]: '1' to take the
-- slot, '0' only to look. Returns {wait_ms, new_ticket}: wait 0 means "your turn: go now".
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local line = tonumber(redis.call('GET', KEYS[2])) or 0
local ticket = tonumber(redis.call('HGET', KEYS[3], ARGV[2]))
local function admit()
  if ARGV[4] ~= '1' then return {0, 0} end
  local next_tat = math.max(tat, now) + interval
  redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX',
             math.ceil(next_tat - now) + 1000)
  if ticket then redis.call('HDEL', KEYS[3], ARGV[2]) end
  return {0, 0}
end
if ticket then
  if now >= ticket and now >= tat then return admit() end
  return {math.ceil(math.max(ticket, tat) - now), 0}
end
if now >= tat and line <= now then return admit() end
local slot = math.max(line + interval, tat, now)
local keep = math.ceil(slot - now) + tonumber(ARGV[3])
redis.call('SET', KEYS[2], string.format('%.3f', slot), 'PX', keep)
redis.call('HSET', KEYS[3], ARGV[2], string.format('%.3f', slot))
redis.call('PEXPIRE', KEYS[3], keep)
return {math.ceil(slot - now), 1}
"""


# `reserve_run(tat, line, interval, wanted, ahead, consume)`: a run of consecutive slots for a
# job's messages (app.delivery.dispatch). `tat`: the sender's TAT (ms); `line`: the last slot
# handed out to a waiting message (ms); `interval`: emission interval (ms); `wanted`: how many
# slots; `ahead`: how far ahead a slot may be (ms); `consume`: '1' to take them, '0' only to
# count them. Returns {count, first_ms}: slot i (0 <= i < count) begins first_ms + i * interval
# from now. None while messages wait in line with tickets: a batch never goes ahead of them
# (they take the per-message path's slots). A Lua function, so the gate can check the provider's
# circuit and reserve in one script.
RESERVE_LUA: Final = """
local function reserve_run(tat_key, line_key, interval_ms, wanted, ahead, consume)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = tonumber(interval_ms)
  local line = tonumber(redis.call('GET', line_key)) or 0
  if line > now then return {0, 0} end
  local tat = tonumber(redis.call('GET', tat_key)) or 0
  local first = math.max(tat, now)
  local fit = math.floor((now + tonumber(ahead) - first) / interval) + 1
  local count = math.max(math.min(tonumber(wanted), fit), 0)
  if count > 0 and consume == '1' then
    local next_tat = first + count * interval
    redis.call('SET', tat_key, string.format('%.3f', next_tat), 'PX',
               math.ceil(next_tat - now) + 1000)
  end
  return {count, string.format('%.3f', first - now)}
end
"""
_RESERVE: Final = (
    RESERVE_LUA + "return reserve_run(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\n"
)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Consecutive slots of one sender: slot i begins `first + i * interval` seconds from the
    moment the reservation was made."""

    count: int
    first: float
    interval: float

    def offset(self, index: int) -> float:
        """Seconds from the reservation until slot `index` begins."""
        return self.first + index * self.interval


@dataclass(frozen=True, slots=True)
class Slot:
    """One answer from the limiter: wait this long (0: go now); `queued` when this call put the
    message in line (a new deferral)."""

    wait: float
    queued: bool


class SenderPacer:
    """Admits messages at their sender's rate, shared by every worker through Redis."""

    def __init__(self, redis: Redis, *, max_inline_wait: float = MAX_INLINE_WAIT_SECONDS) -> None:
        self._script = redis.register_script(_GCRA)
        self._reserve = redis.register_script(_RESERVE)
        self.max_inline_wait = max_inline_wait

    async def reserve(
        self,
        sender_id: uuid.UUID,
        rate: float,
        wanted: int,
        *,
        consume: bool,
        horizon: float | None = None,
    ) -> Reservation:
        """Up to `wanted` consecutive slots of the sender that begin within `horizon` seconds
        (by default the inline wait), in one step (`consume=False`: only count them). None while
        the sender has a line."""
        count, first_ms = await self._reserve(
            keys=self.run_keys(sender_id),
            args=[*self.run_arguments(rate, wanted, horizon), "1" if consume else "0"],
        )
        return self.reservation(rate, count, first_ms)

    @staticmethod
    def run_keys(sender_id: uuid.UUID) -> list[str]:
        """`reserve_run`'s keys for this sender: its TAT and its line."""
        prefix = f"smsgate:pace:{{{sender_id}}}"
        return [f"{prefix}:tat", f"{prefix}:line"]

    def run_arguments(self, rate: float, wanted: int, horizon: float | None) -> list[float | int]:
        """`reserve_run`'s interval, wanted and ahead."""
        ahead_ms = int((self.max_inline_wait if horizon is None else horizon) * 1000)
        return [1000.0 / rate, wanted, ahead_ms]

    @staticmethod
    def reservation(rate: float, count: int, first_ms: str | float) -> Reservation:
        """What `reserve_run` answered, as a `Reservation`."""
        return Reservation(
            count=int(count), first=max(float(first_ms), 0.0) / 1000.0, interval=1 / rate
        )

    async def take(
        self, sender_id: uuid.UUID, message_id: uuid.UUID, rate: float, *, consume: bool = True
    ) -> Slot:
        """One atomic step of the limiter for this message (`consume=False`: only look, but
        still join the line when it is not the message's turn)."""
        prefix = f"smsgate:pace:{{{sender_id}}}"
        wait_ms, queued = await self._script(
            keys=[f"{prefix}:tat", f"{prefix}:line", f"{prefix}:tickets"],
            args=[1000.0 / rate, str(message_id), LINE_TTL_MS, "1" if consume else "0"],
        )
        return Slot(wait=max(int(wait_ms), 0) / 1000.0, queued=bool(queued))

    async def admit(
        self, sender_id: uuid.UUID, message_id: uuid.UUID, rate: float, *, provider: str
    ) -> float:
        """Immediately before the provider call: take the slot (0.0), sleeping through a short
        wait; otherwise how long to defer the message (it keeps its place in line)."""
        return await self._loop(sender_id, message_id, rate, provider)

    async def _loop(
        self, sender_id: uuid.UUID, message_id: uuid.UUID, rate: float, provider: str
    ) -> float:
        waited = 0.0
        for _ in range(MAX_ROUNDS):
            slot = await self.take(sender_id, message_id, rate)
            if slot.queued:
                RATE_LIMIT_DEFERRALS.labels(provider=provider, reason="sender_rate").inc()
            if slot.wait <= 0:
                return 0.0
            if waited + slot.wait > self.max_inline_wait:
                return max(slot.wait - DEFER_LEAD_SECONDS, DEFER_LEAD_SECONDS)
            # A few ms more, so the slot has surely begun by Redis' clock when we ask again.
            await asyncio.sleep(slot.wait + 0.002)
            waited += slot.wait
        return DEFER_LEAD_SECONDS
