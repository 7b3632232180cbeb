"""The SMS pumping alarm: many distinct numbers in one number range, per client, in a short window.

A bot pumping SMS (toll fraud) fills a sign-up form with numbers it is paid for: consecutive or
near-consecutive numbers of one expensive range. Real traffic spreads over many ranges. So, per
client and per range (the country calling code and the first `PUMPING__RANGE_DIGITS` digits of
the national number), Redis counts the distinct numbers of the current window and the previous
one (a HyperLogLog each: 12 KB at most whatever a bot sends) and keeps the client's usual count
per window there (an exponentially weighted average, folded in when a window ends). The count
covers the previous window and the current one so far, a span of 1 to 2 windows; a range is
suspicious when that count reaches `PUMPING__MIN_DISTINCT` and is above
`PUMPING__BASELINE_MULTIPLE` times the usual count scaled to the span (at 30 s into a 60 s
window: 1.5 times the usual count per window), so steady traffic fires at the multiple, not
at half of it. README, "SMS pumping defence", gives the reasoning behind the defaults.

One Lua script counts and judges every range of a request at once. With the `hold` action it
runs on the request, before the accept's database statement (one round trip, never inside a
transaction): the answer decides which messages are held. With `alert` (the default) nothing
waits for the answer: a request only notes its numbers, and one count every
`ALERT_LINGER_SECONDS` takes those of all the requests of that time (one round trip per flush,
not per send); the alarm fires up to that much later, and a number sent at a window's very end
may be counted in the next window. Redis's own clock decides the window, so every API process
agrees on it. A HyperLogLog keeps hashes' registers, not the numbers.
Fail-open: when Redis is down or slower than `PUMPING__TIMEOUT_SECONDS` the messages go out
unjudged (counted and logged): the alarm is a tripwire, and refusing every send while Redis is
away would turn a cache outage into a full outage. Quotas and geographic permissions are the
hard limits.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import phonenumbers
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from app.kernel.outages import REDIS
from app.kernel.settings import PumpingSettings

log = logging.getLogger(__name__)

PUMPING_SUSPECTED = Counter(
    "smsgate_pumping_suspected",
    "Number ranges judged suspicious (one per client, range and window), by country calling "
    "code and action.",
    ["country_code", "action"],
)
PUMPING_HELD = Counter(
    "smsgate_pumping_held_messages",
    "Messages stored `held` by the pumping alarm, by country calling code.",
    ["country_code"],
)
PUMPING_UNCHECKED = Counter(
    "smsgate_pumping_unchecked_messages",
    "Messages accepted without the pumping check because Redis was unavailable (fail-open).",
)

KEY_PREFIX: Final = "smsgate:pumping"
# What an admin may set per client (README, "SMS pumping defence"). The window, the range's
# digits and the half-life stay service-wide: they shape the counts kept in Redis.
CLIENT_SETTINGS: Final = ("action", "min_distinct", "baseline_multiple")

# KEYS: per range, its key prefix (the script derives the window's keys from it: one Redis, not a
# cluster). ARGV: window seconds, (1 - alpha) per window, state TTL, minimum count, multiple,
# then per range its number count and its numbers (PFADD takes 500 at a time: Lua's `unpack`
# has a stack limit).
# Per range: `<prefix>:<window>` a HyperLogLog per window, `<prefix>:s` the state hash (last
# window seen, its count, the usual count), `<prefix>:<window>:alarm` set once when it fires.
# Returns per range: {distinct count over this window and the previous, usual count (text:
# Lua numbers become integers on the way out), 1 if it fired for the first time this window,
# the multiple of the usual count over the span counted (text)}.
_SCRIPT: Final = """
local time = redis.call('TIME')
local window = tonumber(ARGV[1])
local bucket = math.floor(tonumber(time[1]) / window)
-- The span the count covers, in windows: the previous one whole and the current one so far.
local span = 1 + (tonumber(time[1]) % window + tonumber(time[2]) / 1000000) / window
local keep = tonumber(ARGV[2])
local state_ttl = tonumber(ARGV[3])
local minimum = tonumber(ARGV[4])
local multiple = tonumber(ARGV[5])
local out = {}
local a = 6
for r = 1, #KEYS do
  local prefix = KEYS[r]
  local current = prefix .. ':' .. bucket
  local previous = prefix .. ':' .. (bucket - 1)
  local state = prefix .. ':s'
  local n = tonumber(ARGV[a])
  a = a + 1
  local first = a
  while first < a + n do
    local last = math.min(first + 499, a + n - 1)
    redis.call('PFADD', current, unpack(ARGV, first, last))
    first = last + 1
  end
  a = a + n
  redis.call('EXPIRE', current, 2 * window)
  local seen = redis.call('HMGET', state, 'bucket', 'count', 'usual')
  local last_bucket = tonumber(seen[1])
  local usual = tonumber(seen[3]) or 0
  if last_bucket and last_bucket < bucket then
    usual = usual * keep + (1 - keep) * tonumber(seen[2])
    usual = usual * keep ^ (bucket - last_bucket - 1)
  end
  if not last_bucket or last_bucket <= bucket then
    local now_count = redis.call('PFCOUNT', current)
    redis.call('HSET', state, 'bucket', bucket, 'count', now_count, 'usual', tostring(usual))
  end
  redis.call('EXPIRE', state, state_ttl)
  local count = redis.call('PFCOUNT', current, previous)
  local expected = multiple * usual * span
  local fired = 0
  if count >= minimum and count > expected then
    if redis.call('SET', current .. ':alarm', 1, 'NX', 'EX', 2 * window) then
      fired = 1
    end
  end
  out[r] = {count, tostring(usual), fired, tostring(expected)}
end
return out
"""


@dataclass(frozen=True, slots=True)
class RangeReading:
    """One range's state after this request: distinct numbers in the window, the client's
    usual count per window there, the threshold, and whether this request set the alarm off."""

    range: str
    country_code: str
    distinct: int
    usual: float
    threshold: float
    first: bool


@dataclass(frozen=True, slots=True)
class PumpingAlarm:
    """What one request found: the suspicious ranges (by range), the action taken."""

    client_id: uuid.UUID
    action: str
    ranges: dict[str, RangeReading]

    def suspicious(self, to: str, digits: int) -> RangeReading | None:
        """The reading of `to`'s range if that range is suspicious."""
        return self.ranges.get(number_range(to, digits))


def country_code(e164: str) -> str:
    """The country calling code of an E.164 number (they are prefix-free: 1 to 3 digits)."""
    digits = e164.lstrip("+")
    for length in (1, 2, 3):
        if int(digits[:length] or 0) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length]
    return digits[:3]


def number_range(e164: str, digits: int) -> str:
    """The number's range: `+<country code> <first digits of the national number>`."""
    code = country_code(e164)
    national = e164.lstrip("+")[len(code) :]
    return f"+{code} {national[:digits]}"


def effective_settings(
    settings: PumpingSettings, override: Mapping[str, Any] | None
) -> PumpingSettings:
    """The service's settings with a client's own (`CLIENT_SETTINGS`, set by an admin) over
    them."""
    if not override:
        return settings
    own = {name: override[name] for name in CLIENT_SETTINGS if override.get(name) is not None}
    return settings.model_copy(update=own)


def keep_per_window(settings: PumpingSettings) -> float:
    """The usual count's weight kept at each window's end (1 - the EWMA's alpha), from the
    half-life: after `half_life / window` windows an old count weighs half."""
    windows = settings.baseline_half_life_hours * 3600 / settings.window_seconds
    return math.pow(0.5, 1 / windows)


def _arguments(
    settings: PumpingSettings, client_id: uuid.UUID, numbers: dict[str, set[str]]
) -> tuple[list[str], list[Any]]:
    keys = [f"{KEY_PREFIX}:{client_id}:{name}" for name in numbers]
    # The usual count outlives a quiet week, then goes (a client back after that starts anew).
    state_ttl = max(int(settings.baseline_half_life_hours * 3600 * 7), 2 * settings.window_seconds)
    argv: list[Any] = [
        settings.window_seconds,
        repr(keep_per_window(settings)),
        state_ttl,
        settings.min_distinct,
        repr(settings.baseline_multiple),
    ]
    for members in numbers.values():
        argv.append(len(members))
        argv.extend(sorted(members))
    return keys, argv


# With the `alert` action nothing waits for the count: a request's numbers join those of the
# requests around it and are counted together, within this long, in one round trip for all of
# them (or at once when `ALERT_BUFFER_LIMIT` numbers wait). The `hold` action needs its answer
# before the messages are stored, so it counts each request's numbers on the request.
ALERT_LINGER_SECONDS: Final = 0.2
ALERT_BUFFER_LIMIT: Final = 10_000
# What the count off the request waits at most: nothing waits for it, and one that timed out
# after Redis ran it would leave its alarms unannounced for the window (and count as an outage).
BACKGROUND_TIMEOUT_SECONDS: Final = 5.0
# Errors Redis gives one script call that are Redis's state, not the entry's (a replica after a
# failover, memory full, a busy script): an outage, like a refused connection.
_REDIS_WIDE: Final = (ReadOnlyError, OutOfMemoryError, MasterDownError)

# One count: a client, its settings, its numbers by range.
_Entry = tuple[uuid.UUID, PumpingSettings, dict[str, set[str]]]


class VelocityCheck:
    """Counts a client's destinations per range in Redis and says which ranges are suspicious.

    `hold`: each request's numbers are counted before its messages are stored (one round trip),
    and the ranges found suspicious are held. `alert`: counted off the request, with the other
    requests' of the last `ALERT_LINGER_SECONDS` (one round trip per flush, whatever the rate).
    The ranges that fired for the first time in their window get a log line, a metric and
    `on_alarm` (the event)."""

    def __init__(
        self,
        redis: Redis,
        settings: PumpingSettings,
        on_alarm: Callable[[PumpingAlarm, list[RangeReading]], Awaitable[None]] | None = None,
        *,
        linger: float = ALERT_LINGER_SECONDS,
    ) -> None:
        self._redis = redis
        self.settings = settings
        self._script = redis.register_script(_SCRIPT)
        self._on_alarm = on_alarm
        self._linger = linger
        self._waiting: dict[uuid.UUID, tuple[PumpingSettings, dict[str, set[str]]]] = {}
        self._waiting_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def judge(
        self,
        client_id: uuid.UUID,
        numbers: Iterable[str],
        override: Mapping[str, Any] | None = None,
    ) -> PumpingAlarm | None:
        """Count `numbers` (E.164) for the client, with its own settings (`override`) if an
        admin set some. `hold`: the suspicious ranges, or None; `alert`: None (the count comes
        later). Never raises: with Redis unavailable the messages are not judged (fail-open,
        counted)."""
        settings = effective_settings(self.settings, override)
        if settings.action == "off":
            return None
        by_range: dict[str, set[str]] = defaultdict(set)
        for number in numbers:
            by_range[number_range(number, settings.range_digits)].add(number)
        if not by_range:
            return None
        if settings.action == "alert":
            self._wait(client_id, settings, by_range)
            return None
        counted = await self._count([(client_id, settings, by_range)], settings.timeout_seconds)
        if counted is None:
            return None
        suspicious = {
            name: reading
            for name, reading in counted[0].items()
            if reading.distinct >= reading.threshold
        }
        return PumpingAlarm(client_id, settings.action, suspicious) if suspicious else None

    async def report(self, alarm: PumpingAlarm, held: Sequence[str]) -> None:
        """After the messages of a `hold` request are stored (`held`: the numbers of those
        held): the metrics, and the ranges that fired announced. Never raises."""
        for number in held:
            PUMPING_HELD.labels(country_code(number)).inc()
        await self._announce(alarm, [r for r in alarm.ranges.values() if r.first])

    async def flush(self) -> None:
        """Count the numbers waiting now, and wait for every count under way (at shutdown, and
        for tests)."""
        self._start_flush()
        if self._flushes:
            await asyncio.wait(set(self._flushes))

    async def close(self) -> None:
        """Count what waits before the process ends."""
        await self.flush()

    def _wait(
        self, client_id: uuid.UUID, settings: PumpingSettings, found: dict[str, set[str]]
    ) -> None:
        _, ranges = self._waiting.get(client_id, (settings, defaultdict(set)))
        self._waiting[client_id] = (settings, ranges)  # an admin's change applies from now on
        for name, members in found.items():
            ranges[name] |= members
        self._waiting_count += sum(len(members) for members in found.values())
        if self._waiting_count >= ALERT_BUFFER_LIMIT:
            self._start_flush()
        elif self._timer is None:
            # A context of its own: the count's log lines are no request's.
            self._timer = asyncio.get_running_loop().call_later(
                self._linger, self._start_flush, context=contextvars.Context()
            )

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting, self._waiting_count = self._waiting, {}, 0
        if not waiting:
            return
        entries = [
            (client_id, settings, ranges) for client_id, (settings, ranges) in waiting.items()
        ]
        flush = asyncio.create_task(self._flush(entries), context=contextvars.Context())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _flush(self, entries: list[_Entry]) -> None:
        try:
            timeout = max(self.settings.timeout_seconds, BACKGROUND_TIMEOUT_SECONDS)
            counted = await self._count(entries, timeout)
            if counted is None:
                return
            for (client_id, settings, _), readings in zip(entries, counted, strict=True):
                fresh = [reading for reading in readings.values() if reading.first]
                if fresh:
                    alarm = PumpingAlarm(client_id, settings.action, {r.range: r for r in fresh})
                    await self._announce(alarm, fresh)
        except Exception:  # nothing awaits this task: a bug is logged, not lost
            log.exception("the pumping alarm's count failed")

    async def _count(
        self, entries: list[_Entry], timeout: float
    ) -> list[dict[str, RangeReading]] | None:
        """Each entry's readings by range, in one round trip within `timeout`; None when Redis
        is unavailable (the numbers are counted as unchecked)."""
        numbers = sum(len(members) for _, _, ranges in entries for members in ranges.values())
        if REDIS.down:  # known down: do not wait for a timeout on every request
            PUMPING_UNCHECKED.inc(numbers)
            return None
        try:
            # A timeout of its own: a Redis that hangs (rather than refuses) would otherwise
            # cost every send the client's socket timeout. (asyncio.timeout, not wait_for: on
            # Python 3.11 wait_for runs the call in a task of its own.)
            async with asyncio.timeout(timeout):
                replies = await self._run(entries)
            if wide := [a for a in replies if isinstance(a, ResponseError) and _redis_wide(a)]:
                raise wide[0]
        except (RedisError, OSError, TimeoutError) as error:
            REDIS.failed(error, action="pumping check; sent unjudged")
            PUMPING_UNCHECKED.inc(numbers)
            return None
        REDIS.recovered()
        return [
            _readings(client_id, settings, ranges, answer)
            for (client_id, settings, ranges), answer in zip(entries, replies, strict=True)
        ]

    async def _run(self, entries: list[_Entry]) -> list[list[list[Any]] | ResponseError]:
        """The script's answer for each entry, or the error Redis gave that entry (a script
        error is one entry's, not an outage: the pipeline's other entries still count)."""
        if len(entries) == 1:
            client_id, settings, ranges = entries[0]
            keys, argv = _arguments(settings, client_id, ranges)
            try:
                return [cast(list[list[Any]], await self._script(keys=keys, args=argv))]
            except ResponseError as error:
                return [error]
        async with self._redis.pipeline(transaction=False) as pipe:
            for client_id, settings, ranges in entries:
                keys, argv = _arguments(settings, client_id, ranges)
                await self._script(keys=keys, args=argv, client=pipe)
            return cast(
                list[list[list[Any]] | ResponseError], await pipe.execute(raise_on_error=False)
            )

    async def _announce(self, alarm: PumpingAlarm, fresh: list[RangeReading]) -> None:
        """The ranges that fired for the first time in their window (once per window, not per
        request): a metric, a log line, the caller's hook (the event). Never raises."""
        for reading in fresh:
            PUMPING_SUSPECTED.labels(reading.country_code, alarm.action).inc()
            log.warning(
                "sms pumping suspected",
                extra={
                    "client_id": str(alarm.client_id),
                    "range": reading.range,
                    "distinct_numbers": reading.distinct,
                    "usual": round(reading.usual, 2),
                    "threshold": round(reading.threshold, 2),
                    "window_seconds": self.settings.window_seconds,
                    "action": alarm.action,
                },
            )
        if fresh and self._on_alarm is not None:
            try:
                await self._on_alarm(alarm, fresh)
            except Exception:  # the messages are stored; an unwritten event must not fail them
                log.exception("could not record the pumping alarm's event")


def _redis_wide(error: ResponseError) -> bool:
    """Whether a script's error is Redis's state rather than its entry's (`_REDIS_WIDE`)."""
    return isinstance(error, _REDIS_WIDE) or str(error).startswith("BUSY")


def _readings(
    client_id: uuid.UUID,
    settings: PumpingSettings,
    ranges: dict[str, set[str]],
    answer: list[list[Any]] | ResponseError,
) -> dict[str, RangeReading]:
    """One entry's readings by range; none when Redis refused its script (its numbers are
    counted as unchecked, and logged)."""
    if isinstance(answer, ResponseError):
        PUMPING_UNCHECKED.inc(sum(len(members) for members in ranges.values()))
        log.warning(
            "pumping check refused by redis; sent unjudged",
            extra={"client_id": str(client_id), "error": repr(answer)},
        )
        return {}
    return {
        name: _reading(name, reply, settings) for name, reply in zip(ranges, answer, strict=True)
    }


def _reading(name: str, reply: list[Any], settings: PumpingSettings) -> RangeReading:
    distinct, usual_text, fired, expected_text = reply
    return RangeReading(
        range=name,
        country_code=name.split(" ")[0].lstrip("+"),
        distinct=int(distinct),
        usual=float(usual_text),
        # The script's own comparison (its clock decides the span): at least the minimum, and
        # above the multiple of the usual count over the span counted.
        threshold=max(float(settings.min_distinct), float(expected_text) + 1e-9),
        first=bool(fired),
    )
