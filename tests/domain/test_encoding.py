"""Encoding choice and segment counting; every expectation is worked out by hand in comments."""

from __future__ import annotations

import pytest

from app.providers.base import Encoding
from app.sending.encoding import BodyAnalysis, analyze_body

# Written out by kind rather than in table order, so it is not a copy of the module's table.
# 127 characters: the 128 of the basic table minus ESC.
BASIC = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # 26
    "abcdefghijklmnopqrstuvwxyz"  # 26
    "0123456789"  # 10
    " !\"#%&'()*+,-./:;<=>?"  # 21 ASCII punctuation
    "@$_"  # 3 more ASCII
    "\n\r"  # 2 controls
    "£¥¤§¡¿"  # 6 symbols
    "èéùìòàÇÉ"  # 8 accented
    "ÄÖÑÜäöñüÅåØøÆæß"  # 15 Nordic/German/Spanish
    "ΔΦΓΛΩΠΨΣΘΞ"  # 10 Greek capitals
)
EXTENSION = "\f^{}\\[~]|€"  # 10 characters, each sent as ESC + char

CYRILLIC = "ж"  # a BMP character outside GSM-7: 1 UTF-16 unit
EMOJI = "\U0001f600"  # 😀, outside the BMP: a surrogate pair, 2 UTF-16 units


def gsm(segments: int, units: int) -> BodyAnalysis:
    """The analysis expected for a GSM-7 body."""
    return BodyAnalysis(Encoding.GSM7, segments, units, ())


def ucs2(segments: int, units: int, *non_gsm: str) -> BodyAnalysis:
    """The analysis expected for a UCS-2 body."""
    return BodyAnalysis(Encoding.UCS2, segments, units, non_gsm)


# --- the alphabet ------------------------------------------------------------------------------


def test_test_tables_have_the_expected_sizes() -> None:
    # Guards the literals above against typos: 26+26+10+21+3+2+6+8+15+10 = 127.
    assert len(BASIC) == len(set(BASIC)) == 127
    assert len(EXTENSION) == len(set(EXTENSION)) == 10


@pytest.mark.parametrize("char", list(BASIC))
def test_every_basic_character_is_gsm7_and_costs_one_septet(char: str) -> None:
    assert analyze_body(char) == gsm(1, 1)


@pytest.mark.parametrize("char", list(EXTENSION))
def test_every_extension_character_is_gsm7_and_costs_two_septets(char: str) -> None:
    assert analyze_body(char) == gsm(1, 2)


def test_whole_alphabet_in_one_body() -> None:
    # 127 basic x 1 + 10 extension x 2 = 147 septets <= 160.
    assert analyze_body(BASIC + EXTENSION) == gsm(1, 147)


@pytest.mark.parametrize(
    "char",
    [
        "ç",  # only the capital Ç is in the basic table
        "`",
        "\x1b",  # ESC introduces an extension character; it is not sendable by itself
        "\t",
        "û",
        "ê",
        "á",
        "δ",  # Greek lowercase is not in the table
        "\u2126",  # OHM SIGN, a look-alike of the Omega that is in the table
        "\u00a0",  # no-break space
        "\u2019",  # typographic apostrophe, a common paste from word processors
    ],
)
def test_characters_outside_gsm7_force_ucs2(char: str) -> None:
    assert analyze_body(char) == ucs2(1, 1, char)


def test_capital_c_cedilla_is_gsm7_but_lowercase_is_not() -> None:
    assert analyze_body("Ç") == gsm(1, 1)
    assert analyze_body("ç") == ucs2(1, 1, "ç")


def test_french_with_basic_accents_stays_gsm7() -> None:
    # "Votre " 6 + "commande " 9 + "est " 4 + "expédiée " 9 + "à " 2 + "10h" 3 = 33 septets.
    assert analyze_body("Votre commande est expédiée à 10h") == gsm(1, 33)


def test_one_non_gsm_character_switches_the_whole_body_to_ucs2() -> None:
    # Ç and € are GSM-7, û is not. In UCS-2 every character here is 1 unit:
    # Ç a ␠ c o û t e ␠ 5 € = 11 units.
    assert analyze_body("Ça coûte 5€") == ucs2(1, 11, "û")


def test_non_gsm_characters_are_distinct_and_in_order_of_first_appearance() -> None:
    # ç û ç € û ê a ê: non-GSM in first-seen order are ç, û, ê; € and a are GSM-7. 8 units.
    assert analyze_body("çûç€ûêaê") == ucs2(1, 8, "ç", "û", "ê")


# --- GSM-7 segments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "segments"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4)],
)
def test_gsm7_segment_boundaries(length: int, segments: int) -> None:
    # A single segment holds 160; beyond that 153 each: 2 x 153 = 306, 3 x 153 = 459.
    assert analyze_body("a" * length) == gsm(segments, length)


@pytest.mark.parametrize(
    ("body", "segments", "units"),
    [
        ("€" * 80, 1, 160),
        ("€" * 81, 2, 162),
        ("a" * 158 + "€", 1, 160),
        ("a" * 159 + "€", 2, 161),  # 160 characters, but the euro's 2 septets make 161
        ("[" + "a" * 156 + "]", 1, 160),  # 2 + 156 + 2
        ("[" + "a" * 157 + "]", 2, 161),  # 2 + 157 + 2
    ],
)
def test_extension_characters_cost_two_septets(body: str, segments: int, units: int) -> None:
    assert analyze_body(body) == gsm(segments, units)


def test_escape_pair_is_not_split_across_gsm7_segments() -> None:
    # 152 + 2 + 152 = 306 septets, which naively fits in 2 x 153. But segment 1 has only one
    # septet left after the 152 'a', so the euro's pair moves to segment 2 (2 + 151 'a' = 153)
    # and the last 'a' spills into segment 3.
    assert analyze_body("a" * 152 + "€" + "a" * 152) == gsm(3, 306)


def test_escape_pair_that_fits_exactly_stays_in_the_segment() -> None:
    # 151 'a' + euro = 153 fills segment 1 exactly; 153 'a' fill segment 2: 306 septets, 2.
    assert analyze_body("a" * 151 + "€" + "a" * 153) == gsm(2, 306)


def test_segments_of_escape_pairs_hold_76_pairs() -> None:
    # 153 braces = 306 septets; a segment takes 76 pairs (152 septets, a 77th would need 154),
    # so 76 + 76 + 1 pairs -> 3 segments where a naive 306 / 153 says 2.
    assert analyze_body("{" * 153) == gsm(3, 306)


# --- UCS-2 segments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "segments"),
    [(70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)],
)
def test_ucs2_segment_boundaries(length: int, segments: int) -> None:
    # A single segment holds 70; beyond that 67 each: 2 x 67 = 134, 3 x 67 = 201.
    assert analyze_body(CYRILLIC * length) == ucs2(segments, length, CYRILLIC)


def test_gsm_extension_character_costs_one_unit_in_ucs2() -> None:
    # Once the body is UCS-2 there is no escape: each of ж, €, { is one UTF-16 unit.
    assert analyze_body("ж€{") == ucs2(1, 3, "ж")


def test_emoji_counts_two_units() -> None:
    assert analyze_body(EMOJI) == ucs2(1, 2, EMOJI)
    # "Hi " 3 + emoji 2 = 5 units.
    assert analyze_body("Hi " + EMOJI) == ucs2(1, 5, EMOJI)


@pytest.mark.parametrize(
    ("count", "segments", "units"),
    [
        (35, 1, 70),  # 35 x 2 = 70: one segment
        (36, 2, 72),  # 72 > 70: 33 pairs (66 units) per segment -> 33 + 3
        (66, 2, 132),  # 33 + 33
        (67, 3, 134),  # 134 = 2 x 67 units, but only 33 pairs fit per segment: 33 + 33 + 1
    ],
)
def test_emoji_only_bodies(count: int, segments: int, units: int) -> None:
    assert analyze_body(EMOJI * count) == ucs2(segments, units, EMOJI)


def test_surrogate_pair_is_not_split_across_ucs2_segments() -> None:
    # 66 + 2 + 66 = 134 units, which naively fits in 2 x 67. But segment 1 has one unit left
    # after the 66 'ж', so the emoji moves to segment 2 (2 + 65 = 67) and the last 'ж' spills
    # into segment 3.
    body = CYRILLIC * 66 + EMOJI + CYRILLIC * 66
    assert analyze_body(body) == ucs2(3, 134, CYRILLIC, EMOJI)


def test_zwj_sequence_is_counted_per_code_point() -> None:
    # Man + ZWJ + laptop: 2 + 1 + 2 = 5 units; the ZWJ (U+200D) is in the BMP.
    man, zwj, laptop = "\U0001f468", "\u200d", "\U0001f4bb"
    assert analyze_body(man + zwj + laptop) == ucs2(1, 5, man, zwj, laptop)


def test_lone_surrogate_counts_one_unit() -> None:
    # json.loads can produce an unpaired surrogate; it must be counted, not crash the request.
    assert analyze_body("\ud83d") == ucs2(1, 1, "\ud83d")
