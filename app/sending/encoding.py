"""Which encoding an SMS body needs and how many segments it costs.

A body goes out as GSM-7 when every character is in the GSM 03.38 default alphabet (basic table,
1 septet each) or its extension table (ESC + char, 2 septets each); anything else forces UCS-2,
counted in UTF-16 code units. One segment holds 160 septets or 70 units; a longer body is split
into concatenated segments of 153 septets or 67 units (the rest of each segment carries the
concatenation header), and an escape pair or a surrogate pair is never split across two segments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.providers.base import Encoding

# The GSM 03.38 basic table in code order, 0x00-0x7F. 0x1B (ESC) is left out: it only introduces
# an extension character and is not something a user can send. Control and Greek characters are
# escaped so look-alikes (e.g. U+2126 OHM SIGN for Omega) cannot slip in unnoticed.
_GSM7_BASIC_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅå"  # 0x00-0x0F
    "\u0394_\u03a6\u0393\u039b\u03a9\u03a0\u03a8\u03a3\u0398\u039eÆæßÉ"  # 0x10-0x1F, minus ESC
    " !\"#¤%&'()*+,-./"  # 0x20-0x2F; 0x24 is the generic currency sign, '$' lives at 0x02
    "0123456789:;<=>?"  # 0x30-0x3F
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"  # 0x40-0x5F
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"  # 0x60-0x7F
)

# Characters reached through ESC in the default extension table; each costs two septets.
_GSM7_EXTENSION_TABLE = "\f^{}\\[~]|€"

_GSM7_BASIC_SET: frozenset[str] = frozenset(_GSM7_BASIC_TABLE)
_GSM7_EXTENSION_SET: frozenset[str] = frozenset(_GSM7_EXTENSION_TABLE)
_GSM7_ALL: frozenset[str] = _GSM7_BASIC_SET | _GSM7_EXTENSION_SET

_GSM7_SINGLE = 160
_GSM7_MULTI = 153
_UCS2_SINGLE = 70
_UCS2_MULTI = 67
_FIRST_NON_BMP = 0x10000


@dataclass(frozen=True, slots=True)
class BodyAnalysis:
    """The encoding, size and segment count of one SMS body."""

    encoding: Encoding
    segments: int  # number of SMS segments the body needs
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2) in the whole body
    non_gsm_characters: tuple[str, ...]  # distinct characters that forced UCS-2, first seen first


def analyze_body(body: str) -> BodyAnalysis:
    """Pick GSM-7 or UCS-2 for `body` and count its units and segments."""
    # dict.fromkeys de-duplicates in C while keeping first-appearance order, so the membership
    # tests below run once per distinct character rather than once per character.
    distinct = dict.fromkeys(body)
    # issuperset runs in C: most bodies are plain GSM-7 and never need the per-character loop.
    non_gsm = (
        () if _GSM7_ALL.issuperset(distinct) else tuple(c for c in distinct if c not in _GSM7_ALL)
    )

    if not non_gsm:
        escaped = [char for char in distinct if char in _GSM7_EXTENSION_SET]
        if escaped:
            units = len(body) + sum(body.count(char) for char in escaped)
            costs = (2 if char in _GSM7_EXTENSION_SET else 1 for char in body)
        else:
            units, costs = len(body), None
        segments = _segments(units, costs, _GSM7_SINGLE, _GSM7_MULTI)
        return BodyAnalysis(Encoding.GSM7, segments, units, ())

    # surrogatepass: a lone surrogate (possible in a str decoded from JSON) is still one unit.
    units = len(body.encode("utf-16-le", "surrogatepass")) // 2
    has_pairs = units != len(body)
    costs = (2 if ord(char) >= _FIRST_NON_BMP else 1 for char in body) if has_pairs else None
    segments = _segments(units, costs, _UCS2_SINGLE, _UCS2_MULTI)
    return BodyAnalysis(Encoding.UCS2, segments, units, non_gsm)


def _segments(units: int, costs: Iterable[int] | None, single: int, multi: int) -> int:
    """Segments for `units` units; `costs` (per character) is given only when some cost 2."""
    if units == 0:
        return 0
    if units <= single:
        return 1
    if costs is None:
        return -(-units // multi)
    # Two-unit characters cannot straddle a boundary, so pack greedily and start a new segment
    # whenever the next character does not fit in what is left of the current one.
    segments, used = 1, 0
    for cost in costs:
        if used + cost > multi:
            segments += 1
            used = 0
        used += cost
    return segments
