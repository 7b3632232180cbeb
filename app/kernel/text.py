"""Text that PostgreSQL can store: `text` and `jsonb` reject the NUL character, and nothing
encodes a lone surrogate (`"\\ud800"` is valid JSON but no UTF-8: a str holding one cannot be
sent to the database at all)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Final

from pydantic import AfterValidator

# NUL, and any surrogate code point: in a str decoded from JSON a surrogate is always a lone
# one (json.loads joins a valid pair into one character).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def unstorable_reason(value: str) -> str | None:
    """Why no column could hold `value` (NUL, a lone surrogate), or None when one can."""
    if value.isascii():  # the common case, and the cheap test: ASCII holds no surrogate
        if "\x00" in value:
            return "must not contain the NUL character (U+0000)"
        return None
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain the NUL character (U+0000)"
    return "must not contain a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def reject_nul(value: str) -> str:
    """`value` unchanged, or ValueError if it holds a NUL or a lone surrogate."""
    reason = unstorable_reason(value)
    if reason is not None:
        raise ValueError(reason)
    return value


StorableStr = Annotated[str, AfterValidator(reject_nul)]
"""A string accepted from clients: anything but NUL and lone surrogates, which no column could
hold."""


def storable(value: str) -> str:
    """`value` with NUL and lone surrogates replaced by U+FFFD: for text we must keep whatever it
    holds (webhooks, field names in error reports)."""
    if value.isascii() and "\x00" not in value:
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def storable_mapping(values: Mapping[str, str]) -> dict[str, str]:
    """A provider's parameters, made storable as JSON."""
    return {storable(key): storable(value) for key, value in values.items()}
