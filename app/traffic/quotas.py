"""Quotas and rate limits per client: messages and segments per minute and per day.

Counted in Redis, shared by every API process, in ONE round trip per request: a Lua script reads
the client's counters for the current minute and day, judges the request's messages in order
(each one fits, or is over the minute's limit, or over the day's), adds the ones that fit and
returns every verdict, atomically. Two processes' requests cannot both take the last unit.

Windows are fixed: the current UTC minute and the current UTC day (keys expire after their
window). A fixed window is exact, costs one hash per window, and tells a refused client exactly
when it may send again (Retry-After: the window's end); its known weakness, up to twice the
per-minute limit across a minute boundary, is bounded by the daily quota and is what the per-
minute limit is for (smoothing), not a fraud control. A client's day is the UTC day.

Quota is taken before the messages are stored (never inside a database transaction) and given
back when they are not: an opt-out refusal, an Idempotency-Key replay (a replay never counts),
a failed insert.

Redis unreachable (or slower than TRAFFIC__QUOTA_TIMEOUT_SECONDS): by default the send is
accepted unchecked (TRAFFIC__QUOTA_FAIL_OPEN), counted by `smsgate_quota_unchecked_total` and
logged. A transactional service's messages (codes, receipts) matter more than a limit missed for
the minutes of an outage; the destination permissions, the main defence against pumping, need
no Redis and still hold. Set it to false to refuse (503 `quota_unavailable`) instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.kernel.errors import ServiceError, TooManyRequests, Unavailable
from app.kernel.settings import TrafficSettings
from app.traffic.rules import Limits

log = logging.getLogger(__name__)

QUOTA_UNCHECKED = Counter(
    "smsgate_quota_unchecked",
    "Messages accepted without a quota check because Redis was unreachable (fail-open).",
)

MINUTE: Final = 60
DAY: Final = 86400
OK, OVER_MINUTE, OVER_DAY = 0, 1, 2

# KEYS: the minute's hash, the day's hash (fields m: messages, s: segments).
# ARGV: messages/min, segments/min, messages/day, segments/day (0: unlimited), the two TTLs,
# then each message's segments. Returns the four counters after, then one verdict per message.
_SCRIPT: Final = """
local mm = tonumber(redis.call('HGET', KEYS[1], 'm') or '0')
local ms = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local dm = tonumber(redis.call('HGET', KEYS[2], 'm') or '0')
local ds = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local lm, ls = tonumber(ARGV[1]), tonumber(ARGV[2])
local ldm, lds = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {0, 0, 0, 0}
local taken = 0
for i = 7, #ARGV do
  local seg = tonumber(ARGV[i])
  local verdict = 0
  if (ldm > 0 and dm + 1 > ldm) or (lds > 0 and ds + seg > lds) then
    verdict = 2
  elseif (lm > 0 and mm + 1 > lm) or (ls > 0 and ms + seg > ls) then
    verdict = 1
  else
    mm, ms, dm, ds = mm + 1, ms + seg, dm + 1, ds + seg
    taken = taken + 1
  end
  out[#out + 1] = verdict
end
if taken > 0 then
  redis.call('HSET', KEYS[1], 'm', mm, 's', ms)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('HSET', KEYS[2], 'm', dm, 's', ds)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
out[1], out[2], out[3], out[4] = mm, ms, dm, ds
return out
"""


@dataclass
class Verdicts:
    """The quota's answer for one request's messages, and what to tell the client."""

    limits: Limits
    # One per message: OK, OVER_MINUTE or OVER_DAY (all OK when unchecked).
    verdicts: list[int]
    # Messages and segments counted in the minute and the day, after this request.
    used: tuple[int, int, int, int] = (0, 0, 0, 0)
    now: float = 0.0
    keys: tuple[str, str] = ("", "")
    checked: bool = True
    # Segments taken per accepted message (to give them back).
    taken: list[int] = field(default_factory=list)

    def refusal(self, index: int) -> ServiceError | None:
        """Message `index`'s 429, or None if it fits."""
        verdict = self.verdicts[index]
        if verdict == OK:
            return None
        limits = self.limits
        if verdict == OVER_DAY:
            what = _describe(limits.messages_per_day, limits.segments_per_day)
            detail = f"over your daily quota ({what} per UTC day)"
            code, wait = "quota_exceeded", self.reset(DAY)
        else:
            what = _describe(limits.messages_per_minute, limits.segments_per_minute)
            detail = f"over your rate limit ({what} per minute)"
            code, wait = "rate_limited", self.reset(MINUTE)
        headers = {"Retry-After": str(wait), **self.headers()}
        return TooManyRequests(code, f"{detail}; retry after {wait} s", headers=headers)

    def reset(self, window: int) -> int:
        """Seconds until the current `window` ends (at least 1)."""
        return max(1, window - int(self.now) % window)

    def headers(self) -> dict[str, str]:
        """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11): one
        item per limit in force, its remaining units and the seconds until its window resets."""
        limits = self.limits
        policies = [
            ("messages-minute", limits.messages_per_minute, MINUTE, self.used[0]),
            ("segments-minute", limits.segments_per_minute, MINUTE, self.used[1]),
            ("messages-day", limits.messages_per_day, DAY, self.used[2]),
            ("segments-day", limits.segments_per_day, DAY, self.used[3]),
        ]
        active = [policy for policy in policies if policy[1] > 0]
        if not active or not self.checked:
            return {}
        return {
            "RateLimit-Policy": ", ".join(f'"{name}";q={q};w={w}' for name, q, w, _ in active),
            "RateLimit": ", ".join(
                f'"{name}";r={max(0, q - used)};t={self.reset(w)}' for name, q, w, used in active
            ),
        }


def _describe(messages: int, segments: int) -> str:
    parts = [f"{messages} messages" if messages else "", f"{segments} segments" if segments else ""]
    return " and ".join(part for part in parts if part)


class Quotas:
    """The quota counters in Redis (the API's Redis client)."""

    def __init__(self, redis: Redis, settings: TrafficSettings) -> None:
        self._redis = redis
        self._settings = settings
        self._script = redis.register_script(_SCRIPT)

    async def take(
        self, client_id: uuid.UUID, limits: Limits, segments: list[int]
    ) -> Verdicts | ServiceError:
        """Judge and count messages of `segments` each, in order (one Redis round trip); a 503
        instead when Redis fails and the service fails closed."""
        now = time.time()
        keys = _keys(client_id, now)
        arguments: list[Any] = [
            limits.messages_per_minute,
            limits.segments_per_minute,
            limits.messages_per_day,
            limits.segments_per_day,
            2 * MINUTE,
            DAY + MINUTE,
            *segments,
        ]
        try:
            async with asyncio.timeout(self._settings.quota_timeout_seconds):
                answer = await self._script(keys=list(keys), args=arguments)
        except (RedisError, OSError, TimeoutError) as error:
            return self._unchecked(limits, segments, error)
        used = (int(answer[0]), int(answer[1]), int(answer[2]), int(answer[3]))
        verdicts = [int(verdict) for verdict in answer[4:]]
        taken = [count for count, v in zip(segments, verdicts, strict=True) if v == OK]
        return Verdicts(limits, verdicts, used, now, keys, taken=taken)

    def _unchecked(
        self, limits: Limits, segments: list[int], error: BaseException
    ) -> Verdicts | ServiceError:
        log.warning(
            "quota not checked: redis unavailable",
            extra={"error": repr(error), "fail_open": self._settings.quota_fail_open},
        )
        if not self._settings.quota_fail_open:
            return Unavailable(
                "quota_unavailable",
                "the quota store is unreachable; nothing was stored, retry later",
                headers={"Retry-After": "5"},
            )
        QUOTA_UNCHECKED.inc(len(segments))
        return Verdicts(limits, [OK] * len(segments), checked=False)

    async def give_back(self, verdicts: Verdicts, segments: list[int]) -> None:
        """Return what messages that were counted but not stored took (best effort: a failure
        leaves them counted until the window ends)."""
        if not verdicts.checked or not segments:
            return
        minute, day = verdicts.keys
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in (minute, day):
                    pipe.hincrby(key, "m", -len(segments))
                    pipe.hincrby(key, "s", -sum(segments))
                async with asyncio.timeout(self._settings.quota_timeout_seconds):
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("quota not given back", extra={"error": repr(error)})


def _keys(client_id: uuid.UUID, now: float) -> tuple[str, str]:
    """The minute's and the day's keys (one hash slot per client: `{…}`)."""
    return (
        f"traffic:{{{client_id}}}:minute:{int(now) // MINUTE}",
        f"traffic:{{{client_id}}}:day:{int(now) // DAY}",
    )
