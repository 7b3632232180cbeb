"""Traffic rules without I/O: which countries and limits are in force, what a number is, and the
rate-limit fields a refusal carries."""

from __future__ import annotations

import pytest
from phonenumbers import PhoneNumberType
from pydantic import ValidationError

from app.kernel.phone import normalize_phone, number_facts
from app.kernel.settings import TrafficSettings
from app.traffic.permissions import destination_refusal
from app.traffic.quotas import DAY, MINUTE, OK, OVER_DAY, OVER_MINUTE, Verdicts
from app.traffic.rules import ClientRules, Limits


def test_a_clients_list_only_narrows_the_services_even_after_the_service_shrinks() -> None:
    service = TrafficSettings(permitted_countries=["US", "CA"])
    assert ClientRules().countries(service) == {"US", "CA"}
    # FR was permitted when the admin set it; the service no longer permits it.
    assert ClientRules(permitted_countries=frozenset({"FR", "CA"})).countries(service) == {"CA"}


def test_a_clients_own_limits_override_the_defaults_field_by_field() -> None:
    service = TrafficSettings(messages_per_minute=100, messages_per_day=1000)
    limits = ClientRules(messages_per_minute=0, segments_per_day=50).limits(service)
    assert limits == Limits(
        messages_per_minute=0, segments_per_minute=0, messages_per_day=1000, segments_per_day=50
    )
    assert not limits.unlimited
    assert ClientRules().limits(TrafficSettings()).unlimited


def test_numbers_are_known_by_their_own_region_and_type() -> None:
    assert number_facts(normalize_phone("+1 613 555 0123", "US")) == (
        "CA",
        PhoneNumberType.FIXED_LINE_OR_MOBILE,
    )
    assert number_facts(normalize_phone("06 12 34 56 78", "FR"))[0] == "FR"
    # Not seen by normalize_phone in this process: parsed on demand; garbage has no region.
    assert number_facts("+447011123457") == ("GB", PhoneNumberType.PERSONAL_NUMBER)
    assert number_facts("not a number") == (None, PhoneNumberType.UNKNOWN)


def test_destination_refusals_name_the_country_and_the_field() -> None:
    settings = TrafficSettings()
    refusal = destination_refusal("+447400123456", frozenset({"US", "FR"}), settings)
    assert refusal is not None and refusal.code == "destination_not_permitted"
    assert "GB" in refusal.detail and "FR, US" in refusal.detail
    assert refusal.errors is not None and refusal.errors[0].field == "to"
    assert destination_refusal("+14155550123", frozenset({"US"}), settings) is None
    personal = destination_refusal("+447011123456", frozenset({"GB"}), settings)
    assert personal is not None and personal.code == "number_type_not_permitted"
    allowing = TrafficSettings(allow_personal_numbers=True)
    assert destination_refusal("+447011123456", frozenset({"GB"}), allowing) is None


def test_refusals_carry_retry_after_and_the_draft_11_fields() -> None:
    limits = Limits(messages_per_minute=10, segments_per_day=100)
    now = 1_000_000 * DAY + 30 * MINUTE + 48  # 12 s left in the minute
    verdicts = Verdicts(limits, [OK, OVER_MINUTE, OVER_DAY], used=(10, 25, 10, 100), now=now)

    assert verdicts.refusal(0) is None
    minute = verdicts.refusal(1)
    assert minute is not None and minute.code == "rate_limited" and minute.status == 429
    assert minute.headers["Retry-After"] == "12"
    assert minute.headers["RateLimit-Policy"] == (
        '"messages-minute";q=10;w=60, "segments-day";q=100;w=86400'
    )
    assert minute.headers["RateLimit"] == (
        f'"messages-minute";r=0;t=12, "segments-day";r=0;t={DAY - 30 * MINUTE - 48}'
    )
    day = verdicts.refusal(2)
    assert day is not None and day.code == "quota_exceeded"
    assert day.headers["Retry-After"] == str(DAY - 30 * MINUTE - 48)
    assert "100 segments per UTC day" in day.detail


def test_the_service_list_takes_only_real_region_codes() -> None:
    assert TrafficSettings(permitted_countries=["us", "gb"]).permitted_countries == ["US", "GB"]
    with pytest.raises(ValidationError, match="UK"):
        TrafficSettings(permitted_countries=["FR", "UK"])  # the United Kingdom is GB
