"""Quiet hours across a number's time zones (app.kernel.quiet_hours): the release time is
outside the window in every zone of the number, or, when no such time exists, the documented
fallback (the zones quiet at the time of sending decide)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from app.kernel.quiet_hours import SEARCH_HORIZON, QuietHours, zones_for

NIGHT = QuietHours(time(21, 0), time(8, 0))
AUSTRALIAN_MOBILE = "+61412345678"
SYDNEY = ZoneInfo("Australia/Sydney")


def outside_everywhere(quiet: QuietHours, phone: str, at: datetime) -> bool:
    return all(quiet.end_after(at, zone) is None for zone in zones_for(phone))


def test_a_mobile_of_several_zones_waits_until_every_zone_is_awake() -> None:
    # 23:00 in Sydney (December: UTC+11) is 20:00 in Perth: only the east is quiet now, but
    # 08:00 in Sydney is 05:00 in Perth, so the message must wait for Perth's (and the Cocos
    # Islands') 08:00 as well.
    at = datetime(2026, 12, 10, 23, 0, tzinfo=SYDNEY)
    assert NIGHT.end_after(at, ZoneInfo("Australia/Perth")) is None

    released = NIGHT.release(AUSTRALIAN_MOBILE, at)

    assert released is not None
    assert outside_everywhere(NIGHT, AUSTRALIAN_MOBILE, released)
    # The earliest such time: 08:00 on the Cocos Islands (UTC+6:30), the westernmost zone.
    assert released.astimezone(ZoneInfo("Indian/Cocos")).time() == time(8, 0)
    assert released.astimezone(UTC) == datetime(2026, 12, 11, 1, 30, tzinfo=UTC)
    # A moment before, some zone is still inside the window.
    assert not outside_everywhere(NIGHT, AUSTRALIAN_MOBILE, released - timedelta(minutes=1))


def test_a_single_zone_number_waits_for_its_own_morning_only() -> None:
    paris = ZoneInfo("Europe/Paris")
    at = datetime(2026, 12, 10, 22, 30, tzinfo=paris)

    assert NIGHT.release("+33612345678", at) == datetime(2026, 12, 11, 8, 0, tzinfo=paris)
    assert NIGHT.release("+33612345678", at.replace(hour=12)) is None


def test_a_number_awake_everywhere_is_not_delayed() -> None:
    at = datetime(2026, 12, 10, 12, 0, tzinfo=ZoneInfo("Australia/Perth"))  # 15:00 in Sydney

    assert NIGHT.release(AUSTRALIAN_MOBILE, at) is None


def test_zones_whose_daytimes_never_meet_fall_back_to_the_zones_quiet_at_sending() -> None:
    # Awake only 07:00-08:00: Guam (UTC+10) and Honolulu (UTC-10) are 20 h apart, so a +1
    # toll-free number (both among its zones) is never outside the window in every zone.
    short_day = QuietHours(time(8, 0), time(7, 0))
    toll_free = "+18445550100"
    at = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
    assert not any(
        outside_everywhere(short_day, toll_free, at + timedelta(minutes=minutes))
        for minutes in range(0, int(SEARCH_HORIZON.total_seconds() // 60), 15)
    )

    released = short_day.release(toll_free, at)

    inside = [end for zone in zones_for(toll_free) if (end := short_day.end_after(at, zone))]
    assert released == max(inside)
    assert released is not None and released - at < SEARCH_HORIZON
