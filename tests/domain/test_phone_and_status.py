"""Phone number normalisation and the status ordering rule."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneMetadata, PhoneNumberFormat, PhoneNumberType
from phonenumbers.phonenumberutil import _number_type_helper

from app.kernel.phone import InvalidPhoneNumber, _region_and_type, normalize_phone
from app.kernel.status import TERMINAL_STATUSES, MessageStatus, can_advance, statuses_before


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+1 (415) 555-0123", "US", "+14155550123"),
        ("415.555.0123", "US", "+14155550123"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", "US", "+33612345678"),  # '+' ignores the default region
        ("07911 123456", "GB", "+447911123456"),
    ],
)
def test_normalises_to_e164(raw: str, region: str, expected: str) -> None:
    assert normalize_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("01 42 68 53 00", "FR", "fixed-line"),
        ("+44 20 7946 0018", "US", "fixed-line"),
        ("+1 900 555 0123", "US", "premium-rate"),
        ("12", "US", "impossible number: it is too short"),
        ("call me", "US", "not a phone number"),
        ("+1 415 555 01234", "US", "impossible number: it is too long"),
        ("+33 6 12", "US", "impossible number: it is too short"),
        ("+1 555 555 0123", "US", "invalid number"),
    ],
)
def test_refuses_numbers_that_cannot_receive_sms(raw: str, region: str, reason: str) -> None:
    with pytest.raises(InvalidPhoneNumber, match=reason):
        normalize_phone(raw, region)


def test_status_only_moves_forward() -> None:
    order = [MessageStatus.QUEUED, MessageStatus.SENDING, MessageStatus.SENT]
    for earlier_index, earlier in enumerate(order):
        for later in order[earlier_index + 1 :]:
            assert can_advance(earlier, later)
            assert not can_advance(later, earlier)
        assert not can_advance(earlier, earlier)
    for terminal in TERMINAL_STATUSES:
        assert can_advance(MessageStatus.SENT, terminal)
        assert can_advance(MessageStatus.QUEUED, terminal)  # e.g. expired before sending
        for other in MessageStatus:
            assert not can_advance(terminal, other)


def test_statuses_before_delivered_are_the_non_terminal_ones() -> None:
    assert set(statuses_before(MessageStatus.DELIVERED)) == {
        MessageStatus.QUEUED,
        MessageStatus.SENDING,
        MessageStatus.SENT,
    }
    assert statuses_before(MessageStatus.SENDING) == [MessageStatus.QUEUED]


def test_a_scheduled_message_comes_before_queued_and_no_report_moves_it() -> None:
    assert can_advance(MessageStatus.SCHEDULED, MessageStatus.QUEUED)
    assert not can_advance(MessageStatus.QUEUED, MessageStatus.SCHEDULED)
    for status in MessageStatus:
        assert MessageStatus.SCHEDULED not in statuses_before(status)


def _library_region_and_type(number: phonenumbers.PhoneNumber) -> tuple[str | None, int]:
    """phonenumbers' own two steps: the region, then the type under that region's plan."""
    region = phonenumbers.region_code_for_number(number)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(
        number.country_code or 0, region or phonenumbers.UNKNOWN_REGION
    )
    if metadata is None:
        return region, PhoneNumberType.UNKNOWN
    national = phonenumbers.national_significant_number(number)
    return region, _number_type_helper(national, metadata)


def test_region_and_type_agree_with_phonenumbers_on_every_plan() -> None:
    """The one-pass region and type lookup gives what phonenumbers' region lookup then
    `number_type` give: on every region's example numbers of every type, every non-geographic
    entity's, and random digits under every calling code (valid and invalid alike)."""
    rng = random.Random(1)
    raw: list[str] = []
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                raw.append(phonenumbers.format_number(example, PhoneNumberFormat.E164))
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        example = phonenumbers.example_number_for_non_geo_entity(code)
        if example is not None:
            raw.append(phonenumbers.format_number(example, PhoneNumberFormat.E164))
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        raw += [f"+{code}{rng.randint(10 ** rng.randint(5, 11), 10**12)}" for _ in range(40)]
    numbers = [phonenumbers.parse(text, None) for text in raw]
    shared = [n for n in numbers if n.country_code == 1]
    assert len(shared) > 100  # the calling code the shortcut is for is well covered
    for number in numbers:
        assert _region_and_type(number) == _library_region_and_type(number), number
