"""Phone numbers: parse anything a client sends, keep only E.164 numbers that can receive SMS."""

from __future__ import annotations

import re
from typing import Annotated, Final

import phonenumbers
from phonenumbers import NumberParseException, PhoneMetadata, PhoneNumberType, ValidationResult
from phonenumbers.phonenumberutil import _number_type_helper
from pydantic import AfterValidator, Field, ValidationInfo

from app.kernel.settings import get_settings

# Types that can never receive an SMS. FIXED_LINE_OR_MOBILE stays allowed: in the US and some
# other plans the two share ranges and cannot be told apart offline.
_NOT_SMS_CAPABLE: dict[int, str] = {
    PhoneNumberType.FIXED_LINE: "a fixed-line number",
    PhoneNumberType.PREMIUM_RATE: "a premium-rate number",
    PhoneNumberType.SHARED_COST: "a shared-cost number",
    PhoneNumberType.PAGER: "a pager number",
    PhoneNumberType.UAN: "a universal access number",
    PhoneNumberType.VOICEMAIL: "a voicemail access number",
}

_IMPOSSIBLE: dict[int, str] = {
    ValidationResult.INVALID_COUNTRY_CODE: "its country calling code does not exist",
    ValidationResult.TOO_SHORT: "it is too short",
    ValidationResult.TOO_LONG: "it is too long",
    ValidationResult.INVALID_LENGTH: "its length is not used in its region",
}


# Digits and the separators people write numbers with. phonenumbers would read letters as
# keypad digits ("555-CALL" is 555-2255) and a leftover template placeholder ("+1415555XXXX")
# as a real number: a message meant for someone would go to a stranger.
_PHONE_CHARACTERS: Final = re.compile(r"\+?[0-9 ().\-/]*")
_ALLOWED: Final = "digits, spaces and + ( ) . - /"


# What `normalize_phone` learnt of each number it accepted: its region (ISO 3166 alpha-2) and its
# type. The accept pipeline's destination rules read it here instead of parsing the number again
# (a parse and a region lookup cost about 0.3 ms; a batch has up to 1,000 numbers). Bounded: it
# starts afresh when full.
_FACTS: dict[str, tuple[str | None, int]] = {}
_MAX_FACTS: Final = 100_000


class InvalidPhoneNumber(ValueError):
    """A number we cannot text; the message says why, for the client."""


def _only_phone_characters(raw: str) -> bool:
    return _PHONE_CHARACTERS.fullmatch(raw.strip()) is not None


def normalize_phone(raw: str, default_region: str) -> str:
    """The E.164 form of `raw`, or `InvalidPhoneNumber` saying why it cannot receive SMS.

    National-format input is read in `default_region`; input starting with '+' ignores it.
    Anything but digits and the usual separators (letters above all) is refused.
    """
    if not _only_phone_characters(raw):
        raise InvalidPhoneNumber(f"not a phone number: only {_ALLOWED} are allowed")
    try:
        number = phonenumbers.parse(raw, default_region)
    except NumberParseException as error:
        raise InvalidPhoneNumber(f"not a phone number ({error._msg})") from None
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason not in (ValidationResult.IS_POSSIBLE, ValidationResult.IS_POSSIBLE_LOCAL_ONLY):
        raise InvalidPhoneNumber(f"impossible number: {_IMPOSSIBLE.get(reason, 'invalid')}")
    if reason == ValidationResult.IS_POSSIBLE_LOCAL_ONLY:
        raise InvalidPhoneNumber("impossible number: it lacks an area code")
    # The type is UNKNOWN exactly when is_valid_number() is false; asking once halves the cost
    # of the slowest step (batches validate up to 1,000 numbers per request).
    region, kind = _region_and_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        raise InvalidPhoneNumber("invalid number: no such range is assigned in its region")
    not_capable = _NOT_SMS_CAPABLE.get(kind)
    if not_capable is not None:
        raise InvalidPhoneNumber(f"cannot receive SMS: it is {not_capable}")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if len(_FACTS) >= _MAX_FACTS:
        _FACTS.clear()
    _FACTS[e164] = (region, kind)
    return e164


def _region_and_type(number: phonenumbers.PhoneNumber) -> tuple[str | None, int]:
    """The number's region and type, as `region_code_for_number` then `number_type` give them,
    with the type worked out once: for a calling code shared by several regions (+1: the US,
    Canada and twenty more) phonenumbers finds the region by typing the number against each
    region's plan, then `number_type` typed it again (the slowest step of a batch's
    validation)."""
    code = number.country_code or 0
    national = phonenumbers.national_significant_number(number)
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code)
    if regions is None:
        return None, PhoneNumberType.UNKNOWN
    if len(regions) > 1:
        for region in regions:
            metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
            if metadata is None:
                continue
            if metadata.leading_digits is None:
                kind = _number_type_helper(national, metadata)
                if kind != PhoneNumberType.UNKNOWN:
                    return region, kind
            elif re.match(metadata.leading_digits, national):
                return region, _number_type_helper(national, metadata)
        return None, PhoneNumberType.UNKNOWN
    region = regions[0]
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    if metadata is None:
        return region, PhoneNumberType.UNKNOWN
    return region, _number_type_helper(national, metadata)


def number_facts(e164: str) -> tuple[str | None, int]:
    """The region (ISO 3166 alpha-2; None if it has none, e.g. a global service number) and
    the `PhoneNumberType` of an E.164 number `normalize_phone` accepted, usually remembered."""
    facts = _FACTS.get(e164)
    if facts is None:
        try:
            facts = _region_and_type(phonenumbers.parse(e164, None))
        except NumberParseException:
            return None, PhoneNumberType.UNKNOWN
    return facts


def canonical_phone(raw: str, default_region: str) -> str | None:
    """`raw` written as E.164, as sends write numbers, without judging whether it can receive
    SMS; None when it is not a possible phone number (an alphanumeric sender, a typo, letters
    that phonenumbers would read as keypad digits)."""
    if not _only_phone_characters(raw):
        return None
    try:
        number = phonenumbers.parse(raw, default_region)
    except NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


PHONE_CACHE = "phone_cache"
"""Validation-context key of a dict in which `E164` keeps each number it judged (or why it
refused it), so a batch validates each distinct number once."""


def _to_e164(raw: str, info: ValidationInfo) -> str:
    cache = info.context.get(PHONE_CACHE) if isinstance(info.context, dict) else None
    if cache is None:
        return normalize_phone(raw, get_settings().default_region)
    known: str | InvalidPhoneNumber | None = cache.get(raw)
    if known is None:
        try:
            known = normalize_phone(raw, get_settings().default_region)
        except InvalidPhoneNumber as error:
            known = error
        cache[raw] = known
    if isinstance(known, InvalidPhoneNumber):
        raise InvalidPhoneNumber(str(known))
    return known


E164 = Annotated[
    str,
    Field(min_length=1, max_length=40, examples=["+14155550123"]),
    AfterValidator(_to_e164),
]
"""A phone number in any common format, validated and normalised to E.164."""
