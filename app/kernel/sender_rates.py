"""How many messages a second carriers accept from each kind of sender by default.

A new sender gets its kind's rate unless an admin sets one; the database's default for a sender
row inserted without a rate is the same (`app.db.models`), so the table lives here, below both.
"""

from __future__ import annotations

from typing import Final

import phonenumbers

# Messages per second by sender kind (see `default_rate`).
LONG_CODE_RATE: Final = 1.0
TOLL_FREE_RATE: Final = 3.0
SHORT_CODE_RATE: Final = 100.0
ALPHANUMERIC_RATE: Final = 10.0


def default_rate(kind: str, address: str) -> float:
    """A new sender's rate when none is given: what carriers allow its kind by default."""
    if kind == "short_code":
        return SHORT_CODE_RATE
    if kind == "alphanumeric":
        return ALPHANUMERIC_RATE
    try:
        number = phonenumbers.parse(address, None)
    except phonenumbers.NumberParseException:
        return LONG_CODE_RATE
    if phonenumbers.number_type(number) == phonenumbers.PhoneNumberType.TOLL_FREE:
        return TOLL_FREE_RATE
    return LONG_CODE_RATE
