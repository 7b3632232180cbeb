"""Quiet hours: a client's window of recipient-local times (e.g. 21:00 to 08:00) during which
messages sent with `respect_quiet_hours` wait, scheduled for the window's end.

The recipient's time zone comes from the number (`phonenumbers.timezone`). A number that maps to
several zones (a North American toll-free number, a mobile range of a country with several zones)
is in quiet hours when its local time is inside the window in ANY of them, and then waits for
the first time outside the window in EVERY one of them (found by moving to the latest window end
among the zones still inside, again, until none is): nobody who might hold the number is woken
up. When no such time comes within `SEARCH_HORIZON` (zones so far apart that their daytimes never
meet, e.g. a +1 toll-free number under a long window), it waits only for the zones inside the
window at the time of sending (the latest of their window ends). A number whose zone is unknown
is never delayed (there is no local time to judge).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_timezones

UNKNOWN_ZONE = "Etc/Unknown"

# How far past the time of sending a release time good for every zone is looked for: each
# zone's window comes back daily, so two days cover every combination of them.
SEARCH_HORIZON: Final = timedelta(hours=48)


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window of local times, `start` included, `end` excluded; it may wrap midnight
    (start 21:00, end 08:00). `start == end` is refused when set (an empty or full day)."""

    start: time
    end: time

    def inside(self, local: time) -> bool:
        """Whether a local wall time is in the window."""
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def end_after(self, at: datetime, zone: ZoneInfo) -> datetime | None:
        """When the window that `at` falls in ends in `zone`, or None if `at` is outside it."""
        local = at.astimezone(zone)
        wall = local.time().replace(tzinfo=None)
        if not self.inside(wall):
            return None
        day = local.date() if wall < self.end else local.date() + timedelta(days=1)
        return datetime.combine(day, self.end, tzinfo=zone)

    def release(self, phone: str, at: datetime) -> datetime | None:
        """When a message to `phone` due at `at` may go: None if it need not wait. Moving to
        the latest window end among the zones inside never skips a good time (that zone is
        inside until then), so the first time outside in every zone is the earliest."""
        zones = zones_for(phone)
        first = self._latest_end(at, zones)
        candidate = first
        while candidate is not None and candidate - at <= SEARCH_HORIZON:
            later = self._latest_end(candidate, zones)
            if later is None:
                return candidate
            candidate = later
        return first  # no time suits every zone: the zones quiet at `at` decide

    def _latest_end(self, at: datetime, zones: tuple[ZoneInfo, ...]) -> datetime | None:
        """The latest window end among the zones `at` is inside the window in (None: none)."""
        ends = [end for zone in zones if (end := self.end_after(at, zone)) is not None]
        return max(ends) if ends else None


@lru_cache(maxsize=8192)
def zones_for(phone: str) -> tuple[ZoneInfo, ...]:
    """The time zones of an E.164 number (none when unknown)."""
    try:
        names = phone_timezones.time_zones_for_number(phonenumbers.parse(phone))
    except phonenumbers.NumberParseException:
        return ()
    zones = []
    for name in names:
        if name == UNKNOWN_ZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except ZoneInfoNotFoundError:
            continue
    return tuple(zones)


def quiet_hours_of(start: time | None, end: time | None) -> QuietHours | None:
    """A client's stored window (both times or neither), as `QuietHours`."""
    if start is None or end is None:
        return None
    return QuietHours(start, end)
