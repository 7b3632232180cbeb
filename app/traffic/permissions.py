"""Destination permissions: which countries and which kinds of number a send may go to.

SMS pumping fills forms with numbers in expensive ranges; every message to them is paid for.
A message goes only to a country on the service's list (TRAFFIC__PERMITTED_COUNTRIES), narrowed
per client by an admin, whatever its sender: a French number is refused from a US long code as
from anything else when France is not permitted. The country is the number's own (its region in
the numbering plan), not the sender's.

Kinds of number: premium-rate, shared-cost and universal access numbers are refused for every
send already (`app.kernel.phone`: they cannot receive SMS and only cost money). Personal numbers
(UK 070, "follow-me" ranges elsewhere) are refused unless TRAFFIC__ALLOW_PERSONAL_NUMBERS is
set: they forward to any phone at a premium termination rate and are a classic pumping target.
Toll-free numbers (text-enabled in North America) and VoIP numbers (many real people's phones)
are allowed: they cost what a mobile costs.
"""

from __future__ import annotations

from typing import Final

from phonenumbers import PhoneNumberType

from app.kernel.errors import FieldError, PolicyRefusal
from app.kernel.phone import number_facts
from app.kernel.settings import TrafficSettings

_COSTLY: Final = {PhoneNumberType.PERSONAL_NUMBER: "a personal (call-forwarding) number"}


def destination_refusal(
    to: str, countries: frozenset[str], settings: TrafficSettings
) -> PolicyRefusal | None:
    """Why a message may not go to `to` (E.164), or None. Pure: no I/O."""
    region, kind = number_facts(to)
    if region not in countries:
        country = region or "a non-geographic range"
        reason = (
            f"{to} is in {country}, not a permitted destination "
            f"(permitted: {', '.join(sorted(countries)) or 'none'})"
        )
        return PolicyRefusal(
            "destination_not_permitted", reason, errors=[FieldError(field="to", reason=reason)]
        )
    costly = _COSTLY.get(kind)
    if costly is not None and not settings.allow_personal_numbers:
        reason = f"{to} is {costly}; such numbers are refused for transactional traffic"
        return PolicyRefusal(
            "number_type_not_permitted", reason, errors=[FieldError(field="to", reason=reason)]
        )
    return None
