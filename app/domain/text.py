"""Text that PostgreSQL can store: `text` and `jsonb` reject the NUL character."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator


def reject_nul(value: str) -> str:
    """`value` unchanged, or ValueError if it holds a NUL."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


StorableStr = Annotated[str, AfterValidator(reject_nul)]
"""A string accepted from clients: anything but NUL, which no column could hold."""


def storable(value: str) -> str:
    """`value` with NUL replaced by U+FFFD: for text we must keep whatever it holds (webhooks)."""
    return value.replace("\x00", "\ufffd")


def storable_mapping(values: Mapping[str, str]) -> dict[str, str]:
    """A provider's parameters, made storable as JSON."""
    return {storable(key): storable(value) for key, value in values.items()}
