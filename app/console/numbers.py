"""Numbers an operator types, in any format, as the service stores them (E.164)."""

from __future__ import annotations

from app.kernel.phone import InvalidPhoneNumber, normalize_phone


def read_number(raw: str | None, default_region: str) -> tuple[str | None, str | None]:
    """(the E.164 number, None), or (None, why it is not one); (None, None) when empty."""
    if raw is None or not raw.strip():
        return None, None
    try:
        return normalize_phone(raw.strip(), default_region), None
    except InvalidPhoneNumber as error:
        return None, str(error)
