"""Keyword matching, keyword configs, the replies a sender still lacks, and reply selection.

Every expected keyword, text and list below is written out by hand, not read from the module.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from app.providers.base import Encoding
from app.senders.keywords import (
    BUILTIN_KEYWORDS,
    DEFAULT_REPLIES,
    CategoryConfig,
    CustomKeyword,
    KeywordCategory,
    KeywordConfig,
    KeywordMatch,
    match_keyword,
    missing_replies,
    normalize_keyword,
    reply_text,
)
from app.sending.encoding import analyze_body

OPT_OUT = KeywordCategory.OPT_OUT
OPT_IN = KeywordCategory.OPT_IN
HELP = KeywordCategory.HELP
CUSTOM = KeywordCategory.CUSTOM

# (category, language, keyword) for every built-in keyword.
BUILTINS = [
    (OPT_OUT, "en", "STOP"),
    (OPT_OUT, "en", "STOPALL"),
    (OPT_OUT, "en", "UNSUBSCRIBE"),
    (OPT_OUT, "en", "CANCEL"),
    (OPT_OUT, "en", "END"),
    (OPT_OUT, "en", "QUIT"),
    (OPT_OUT, "en", "REVOKE"),
    (OPT_OUT, "en", "OPTOUT"),
    (OPT_OUT, "fr", "ARRET"),
    (OPT_OUT, "fr", "ARRETE"),
    (OPT_OUT, "fr", "DESABONNER"),
    (OPT_IN, "en", "START"),
    (OPT_IN, "en", "YES"),
    (OPT_IN, "en", "UNSTOP"),
    (HELP, "en", "HELP"),
    (HELP, "en", "INFO"),
    (HELP, "fr", "AIDE"),
]

OPT_OUT_EN = (
    "You have been unsubscribed and will receive no more messages from us. "
    "Reply START to resubscribe."
)
OPT_OUT_FR = (
    "Votre désabonnement est confirmé, vous ne recevrez plus de messages de notre part. "
    "Répondez START pour vous réabonner."
)
OPT_IN_EN = (
    "You have been resubscribed and will receive our messages again. "
    "Reply STOP to unsubscribe or HELP for help."
)
OPT_IN_FR = (
    "Votre réabonnement est confirmé, vous recevrez à nouveau nos messages. "
    "Répondez ARRET pour vous désabonner ou AIDE pour de l'aide."
)
HELP_EN = "To unsubscribe, reply STOP. Message and data rates may apply."
HELP_FR = (
    "Pour vous désabonner, répondez ARRET. "
    "Des frais de messagerie texte et de données peuvent s'appliquer."
)

OPT_OUT_EN_WORDS = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"]
OPT_OUT_FR_WORDS = ["ARRET", "ARRETE", "DESABONNER"]
# The built-in opt-out and help keywords, which a config must keep (in any language).
OPT_OUT_KEYWORDS = {"en": OPT_OUT_EN_WORDS, "fr": OPT_OUT_FR_WORDS}
HELP_KEYWORDS = {"en": ["HELP", "INFO"], "fr": ["AIDE"]}


def config_from(changes: dict[str, Any]) -> KeywordConfig:
    """The default config with some top-level parts replaced, validated as stored JSON would be."""
    data = KeywordConfig().model_dump(mode="json")
    data.update(changes)
    return KeywordConfig.model_validate(data)


def all_in_english(*, replies: bool) -> KeywordConfig:
    """A config with the French opt-out and help keywords filed under English, answered in
    English if asked: every built-in keyword is kept, so it is valid."""
    return config_from(
        {
            "opt_out": {
                "keywords": {"en": [*OPT_OUT_EN_WORDS, *OPT_OUT_FR_WORDS]},
                "replies": {"en": "Bye."} if replies else {},
            },
            "help": {
                "keywords": {"en": ["HELP", "INFO", "AIDE"]},
                "replies": {"en": "Reply STOP to stop."} if replies else {},
            },
        }
    )


# --- built-in sets and defaults ----------------------------------------------------------------


def test_builtin_keyword_sets() -> None:
    assert {
        category: {language: tuple(words) for language, words in by_language.items()}
        for category, by_language in BUILTIN_KEYWORDS.items()
    } == {
        OPT_OUT: {
            "en": (
                "STOP",
                "STOPALL",
                "UNSUBSCRIBE",
                "CANCEL",
                "END",
                "QUIT",
                "REVOKE",
                "OPTOUT",
            ),
            "fr": ("ARRET", "ARRETE", "DESABONNER"),
        },
        OPT_IN: {"en": ("START", "YES", "UNSTOP")},
        HELP: {"en": ("HELP", "INFO"), "fr": ("AIDE",)},
    }


def test_default_config_is_the_builtin_sets_without_replies() -> None:
    config = KeywordConfig()
    assert config.opt_out == CategoryConfig(
        keywords={"en": OPT_OUT_EN_WORDS, "fr": ["ARRET", "ARRETE", "DESABONNER"]}
    )
    assert config.opt_in == CategoryConfig(keywords={"en": ["START", "YES", "UNSTOP"]})
    assert config.help == CategoryConfig(keywords={"en": ["HELP", "INFO"], "fr": ["AIDE"]})
    assert config.custom == []
    assert config.opt_out.replies == config.opt_in.replies == config.help.replies == {}


def test_default_configs_do_not_share_state() -> None:
    first, second = KeywordConfig(), KeywordConfig()
    first.opt_out.keywords["en"].append("HALT")
    assert second.opt_out.keywords["en"] == OPT_OUT_EN_WORDS


def test_default_replies() -> None:
    assert {category: dict(by_language) for category, by_language in DEFAULT_REPLIES.items()} == {
        OPT_OUT: {"en": OPT_OUT_EN, "fr": OPT_OUT_FR},
        OPT_IN: {"en": OPT_IN_EN, "fr": OPT_IN_FR},
        HELP: {"en": HELP_EN, "fr": HELP_FR},
    }


@pytest.mark.parametrize("text", [OPT_OUT_EN, OPT_OUT_FR, OPT_IN_EN, OPT_IN_FR, HELP_EN, HELP_FR])
def test_default_replies_fit_one_gsm7_segment(text: str) -> None:
    # A stray "ê", "ç" or curly apostrophe would force UCS-2 and could cost a second segment.
    analysis = analyze_body(text)
    assert (analysis.encoding, analysis.segments) == (Encoding.GSM7, 1)


# --- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Stop", "STOP"),
        (" stop. ", "STOP"),
        ("ARRÊT", "ARRET"),
        ("arret!", "ARRET"),
        ("«Arrêt»", "ARRET"),
        ("«\u00a0arrêt\u00a0»", "ARRET"),  # French typography puts no-break spaces inside «»
        ("STOP!!!", "STOP"),
        ("¡Stop!", "STOP"),
        ("¿Info?", "INFO"),
        ("... stop ...", "STOP"),
        ('"stop";', "STOP"),
        ("'stop',", "STOP"),
        ("-- stop --", "STOP"),
        ("(stop)", "STOP"),
        ("\tstop\r\n", "STOP"),
        ("Désabonner", "DESABONNER"),
        ("ARRÊTÉ", "ARRETE"),
        ("\uff53\uff54\uff4f\uff50", "STOP"),  # full-width "stop", as some keyboards type it
        ("STOP 👍", "STOP"),
        ("stop ✋🏽", "STOP"),  # an emoji with a skin-tone modifier
        ("❤️ stop", "STOP"),  # an emoji with a variation selector
        ("\u200bstop\ufeff", "STOP"),  # zero-width space and byte-order mark
        ("  opt   out  ", "OPT OUT"),
        ("heures d'ouverture ?", "HEURES D'OUVERTURE"),
        ("Straße", "STRASSE"),
        ("please stop texting me", "PLEASE STOP TEXTING ME"),
        ("", ""),
        ("   ", ""),
        ("?!…", ""),
    ],
)
def test_normalize_keyword(text: str, expected: str) -> None:
    assert normalize_keyword(text) == expected
    assert normalize_keyword(expected) == expected  # normalising twice changes nothing


# --- matching the built-in keywords ------------------------------------------------------------


def variants(keyword: str) -> list[str]:
    """Ways a person may type `keyword`, all of which must match it."""
    lower = keyword.lower()
    return [
        keyword,
        lower,
        keyword.capitalize(),
        f"  {lower}  ",
        f"\n{keyword}\n",
        f"{lower}.",
        f"{keyword}!!!",
        f"{keyword}?",
        f"¡{keyword.capitalize()}!",
        f"«{lower}»",
        f"« {keyword} »",
        f'"{keyword}"',
        f" {lower} . ",
    ]


@pytest.mark.parametrize(("category", "language", "keyword"), BUILTINS)
def test_every_builtin_keyword_matches_with_variants(
    category: KeywordCategory, language: str, keyword: str
) -> None:
    config = KeywordConfig()
    expected = KeywordMatch(category, keyword, language)
    for body in variants(keyword):
        assert match_keyword(config, body) == expected, body


@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("ARRÊT", "ARRET"),
        ("Arrêt", "ARRET"),
        ("arrêt!", "ARRET"),
        ("«Arrêt»", "ARRET"),
        ("« arrêt »", "ARRET"),
        ("Arrêté", "ARRETE"),
        ("ARRÊTE", "ARRETE"),
        ("arrêté.", "ARRETE"),
        ("DÉSABONNER", "DESABONNER"),
        ("désabonner", "DESABONNER"),
        ("Désabonner !", "DESABONNER"),
        ("«Désabonner»", "DESABONNER"),
    ],
)
def test_french_opt_out_with_accents(body: str, keyword: str) -> None:
    assert match_keyword(KeywordConfig(), body) == KeywordMatch(OPT_OUT, keyword, "fr")


@pytest.mark.parametrize("body", ["Aide", "aide ?", "« AIDE »", "Aidé"])
def test_french_help_with_variants(body: str) -> None:
    assert match_keyword(KeywordConfig(), body) == KeywordMatch(HELP, "AIDE", "fr")


@pytest.mark.parametrize(
    "body",
    [
        "please stop texting me",
        "stop it",
        "I want to stop",
        "don't stop",
        "STOP STOP",
        "stop.please",
        "S T O P",
        "ST OP",
        "STOPP",
        "stopping",
        "HELP ME",
        "need info",
        "yes please",
        "start now",
        "Arrêtez de m'écrire",
        "aide-moi",
        "",
        "   ",
        "!!!",
        "👍",
    ],
)
def test_other_messages_do_not_match(body: str) -> None:
    assert match_keyword(KeywordConfig(), body) is None


# --- custom keywords ---------------------------------------------------------------------------


HOURS_REPLY = "We are open 9am-5pm, Monday to Friday."


def hours_config() -> KeywordConfig:
    """The default config plus a custom HOURS keyword and a French HORAIRES one."""
    return KeywordConfig(
        custom=[
            CustomKeyword(keyword="HOURS", reply=HOURS_REPLY),
            CustomKeyword(keyword="Horaires", reply="Ouvert de 9 h à 17 h.", language="fr"),
        ]
    )


@pytest.mark.parametrize("body", ["HOURS", "hours", " Hours? ", "«hours»", "HOURS!!!", "hóurs"])
def test_custom_keyword_matches_with_the_same_rules(body: str) -> None:
    config = hours_config()
    match = match_keyword(config, body)
    assert match == KeywordMatch(CUSTOM, "HOURS", "en")
    assert reply_text(config, match) == HOURS_REPLY


def test_custom_keyword_in_french() -> None:
    config = hours_config()
    match = match_keyword(config, "horaires ?")
    assert match == KeywordMatch(CUSTOM, "HORAIRES", "fr")
    assert reply_text(config, match) == "Ouvert de 9 h à 17 h."


def test_custom_keyword_inside_a_sentence_does_not_match() -> None:
    assert match_keyword(hours_config(), "what are your hours?") is None


def test_builtin_keywords_still_match_next_to_custom_ones() -> None:
    assert match_keyword(hours_config(), "stop") == KeywordMatch(OPT_OUT, "STOP", "en")


# --- validation --------------------------------------------------------------------------------


def test_keywords_are_stored_normalised() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {
                    "en": [
                        "stop",
                        "Stopall",
                        "unsubscribe.",
                        "CANCEL",
                        "end",
                        " Quit! ",
                        "revoke",
                        "OptOut",
                    ],
                    "fr": ["arrêt", "ARRÊTÉ", "«Désabonner»"],
                }
            },
            "custom": [{"keyword": "  heures d'ouverture ? ", "reply": "9 h - 17 h"}],
        }
    )
    assert config.opt_out.keywords == OPT_OUT_KEYWORDS
    assert config.custom == [
        CustomKeyword(keyword="HEURES D'OUVERTURE", reply="9 h - 17 h", language="en")
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"custom": [{"keyword": "stop", "reply": "Hi"}]},
            r"keyword 'STOP' appears twice in opt_out/en and custom\[0\]",
        ),
        (
            {"help": {"keywords": {"en": ["HELP", "INFO"], "fr": ["AIDE", "help"]}}},
            "keyword 'HELP' appears twice in help/en and help/fr",
        ),
        (
            {"opt_in": {"keywords": {"en": ["START"], "fr": ["ARRÊT"]}}},
            "keyword 'ARRET' appears twice in opt_out/fr and opt_in/fr",
        ),
        (
            {"opt_in": {"keywords": {"en": ["START", "start!"]}}},
            "keyword 'START' appears twice in opt_in/en",
        ),
        (
            {
                "custom": [
                    {"keyword": "HOURS", "reply": "9-5"},
                    {"keyword": "hours?", "reply": "9-5", "language": "fr"},
                ]
            },
            r"keyword 'HOURS' appears twice in custom\[0\] and custom\[1\]",
        ),
    ],
)
def test_duplicate_keywords_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config_from(changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"help": {"keywords": {**HELP_KEYWORDS, "es": ["AYUDA", "?!"]}}},
            "keyword '\\?!' is empty",
        ),
        ({"help": {"keywords": {**HELP_KEYWORDS, "es": ["   "]}}}, "is empty"),
        ({"custom": [{"keyword": "...", "reply": "Hi"}]}, "is empty"),
        ({"custom": [{"keyword": "HOURS", "reply": ""}]}, "at least 1 character"),
        ({"custom": [{"keyword": "HOURS", "reply": "  \n "}]}, "a reply cannot be blank"),
        ({"custom": [{"keyword": "HOURS"}]}, "reply\n  Field required"),
        ({"custom": [{"keyword": "HOURS", "reply": "x" * 1601}]}, "at most 1600 characters"),
        ({"help": {"keywords": HELP_KEYWORDS, "replies": {"en": ""}}}, "at least 1 character"),
        ({"help": {"keywords": HELP_KEYWORDS, "replies": {"en": "x" * 1601}}}, "at most 1600"),
        ({"help": {"keywords": {**HELP_KEYWORDS, "ES": ["AYUDA"]}}}, "should match pattern"),
        ({"help": {"keywords": {**HELP_KEYWORDS, "spa": ["AYUDA"]}}}, "should match pattern"),
        ({"help": {"keywords": HELP_KEYWORDS, "replies": {"En": "Hi"}}}, "should match pattern"),
        ({"custom": [{"keyword": "HOURS", "reply": "Hi", "language": "fra"}]}, "pattern"),
        ({"help": {"keywords": {**HELP_KEYWORDS, "es": ["H" * 65]}}}, "longer than 64 characters"),
        ({"help": {"replies": {"en": "Hi"}}}, "keywords\n  Field required"),
        ({"help": {"keywords": HELP_KEYWORDS, "reply": {"en": "Hi"}}}, "Extra inputs"),
        ({"opt_outs": {"keywords": {}}}, "Extra inputs"),
        ({"custom": [{"keyword": "HOURS", "reply": "Hi", "lang": "fr"}]}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config_from(changes)


def test_longest_keyword_is_accepted() -> None:
    config = config_from({"custom": [{"keyword": "h" * 64, "reply": "Hi"}]})
    assert match_keyword(config, "h" * 64) == KeywordMatch(CUSTOM, "H" * 64, "en")


# --- editing a sender's sets -------------------------------------------------------------------


def test_editing_the_builtin_sets() -> None:
    data = KeywordConfig().model_dump(mode="json")
    data["opt_in"]["keywords"]["en"].remove("YES")
    data["opt_out"]["keywords"]["en"].append("stopp")
    config = KeywordConfig.model_validate(data)

    assert config.opt_in.keywords == {"en": ["START", "UNSTOP"]}
    assert config.opt_out.keywords["en"][-1] == "STOPP"
    assert match_keyword(config, "yes") is None
    assert match_keyword(config, "Stopp!") == KeywordMatch(OPT_OUT, "STOPP", "en")
    assert match_keyword(config, "stop") == KeywordMatch(OPT_OUT, "STOP", "en")
    assert match_keyword(config, "start") == KeywordMatch(OPT_IN, "START", "en")


def test_a_removed_builtin_keyword_can_become_a_custom_one() -> None:
    config = KeywordConfig(
        opt_in=CategoryConfig(keywords={"en": ["START", "UNSTOP"]}),
        custom=[CustomKeyword(keyword="yes", reply="Thanks, see you on Monday.")],
    )
    match = match_keyword(config, "Yes!")
    assert match == KeywordMatch(CUSTOM, "YES", "en")
    assert reply_text(config, match) == "Thanks, see you on Monday."


@pytest.mark.parametrize(
    "opt_in",
    [
        {"keywords": {"en": ["START", "UNSTOP"]}},  # YES removed
        {"keywords": {"en": ["REJOIN"], "fr": ["REPRENDRE"]}},  # every built-in replaced
        {"keywords": {}},  # no opt-in keyword at all
    ],
)
def test_opt_in_builtin_keywords_stay_removable(opt_in: dict[str, Any]) -> None:
    config = config_from({"opt_in": opt_in})
    assert config.opt_in.keywords == opt_in["keywords"]
    assert match_keyword(config, "yes") is None
    assert match_keyword(config, "stop") == KeywordMatch(OPT_OUT, "STOP", "en")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # French opt-out keywords removed, to run English-only.
        (
            {"opt_out": {"keywords": {"en": OPT_OUT_EN_WORDS}, "replies": {"en": "Bye."}}},
            "opt_out must keep its built-in keywords; missing: ARRET, ARRETE, DESABONNER",
        ),
        # One English opt-out keyword removed.
        (
            {"opt_out": {"keywords": {"en": OPT_OUT_EN_WORDS[1:], "fr": OPT_OUT_FR_WORDS}}},
            "opt_out must keep its built-in keywords; missing: STOP",
        ),
        # The French help keyword removed.
        (
            {"help": {"keywords": {"en": ["HELP", "INFO"]}, "replies": {"en": "Help."}}},
            "help must keep its built-in keywords; missing: AIDE",
        ),
        # STOP removed from opt-out and taken over by a custom keyword.
        (
            {
                "opt_out": {"keywords": {"en": OPT_OUT_EN_WORDS[1:], "fr": OPT_OUT_FR_WORDS}},
                "custom": [{"keyword": "stop", "reply": "Our hours are 9-5."}],
            },
            "opt_out must keep its built-in keywords; missing: STOP",
        ),
        # ARRET moved from opt-out into opt-in.
        (
            {
                "opt_out": {"keywords": {"en": OPT_OUT_EN_WORDS, "fr": ["ARRETE", "DESABONNER"]}},
                "opt_in": {"keywords": {"en": ["START", "YES", "UNSTOP"], "fr": ["ARRET"]}},
            },
            "opt_out must keep its built-in keywords; missing: ARRET",
        ),
        # HELP moved from help into opt-out.
        (
            {
                "opt_out": {"keywords": {**OPT_OUT_KEYWORDS, "es": ["HELP"]}},
                "help": {"keywords": {"en": ["INFO"], "fr": ["AIDE"]}},
            },
            "help must keep its built-in keywords; missing: HELP",
        ),
        # Every opt-out keyword removed.
        (
            {"opt_out": {"keywords": {"en": [], "fr": []}}},
            "opt_out must keep its built-in keywords; missing: ARRET, ARRETE, CANCEL, DESABONNER, "
            "END, OPTOUT, QUIT, REVOKE, STOP, STOPALL, UNSUBSCRIBE",
        ),
        # Every help keyword removed.
        (
            {"help": {"keywords": {}}},
            "help must keep its built-in keywords; missing: AIDE, HELP, INFO",
        ),
    ],
)
def test_removing_a_builtin_opt_out_or_help_keyword_is_refused(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        config_from(changes)


def test_builtin_keywords_may_move_between_languages_of_their_category() -> None:
    config = all_in_english(replies=False)
    assert config.opt_out.keywords == {"en": [*OPT_OUT_EN_WORDS, *OPT_OUT_FR_WORDS]}
    assert config.help.keywords == {"en": ["HELP", "INFO", "AIDE"]}
    assert match_keyword(config, "Arrêt") == KeywordMatch(OPT_OUT, "ARRET", "en")
    assert match_keyword(config, "aide") == KeywordMatch(HELP, "AIDE", "en")


def test_a_new_language() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {**OPT_OUT_KEYWORDS, "es": ["Alto", "cancelar"]},
                "replies": {"es": "Has sido dado de baja."},
            }
        }
    )
    match = match_keyword(config, "¡Alto!")
    assert match == KeywordMatch(OPT_OUT, "ALTO", "es")
    assert reply_text(config, match) == "Has sido dado de baja."
    assert match_keyword(config, "Cancelar") == KeywordMatch(OPT_OUT, "CANCELAR", "es")


# --- missing replies ---------------------------------------------------------------------------


def test_defaults_without_replies_miss_everything() -> None:
    assert missing_replies(KeywordConfig(), accept_defaults=False) == [
        "help/en",
        "help/fr",
        "opt_out/en",
        "opt_out/fr",
    ]


def test_everything_configured_is_complete() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": OPT_OUT_KEYWORDS,
                "replies": {"en": "Bye.", "fr": "Au revoir."},
            },
            "help": {
                "keywords": HELP_KEYWORDS,
                "replies": {"en": "Reply STOP to stop.", "fr": "Répondez ARRET."},
            },
        }
    )
    assert missing_replies(config, accept_defaults=False) == []


def test_only_english_configured_while_french_keywords_remain() -> None:
    config = config_from(
        {
            "opt_out": {"keywords": OPT_OUT_KEYWORDS, "replies": {"en": "Bye."}},
            "help": {"keywords": HELP_KEYWORDS, "replies": {"en": "Reply STOP to stop."}},
        }
    )
    assert missing_replies(config, accept_defaults=False) == ["help/fr", "opt_out/fr"]


def test_french_keywords_filed_under_english_need_only_english_replies() -> None:
    assert missing_replies(all_in_english(replies=True), accept_defaults=False) == []
    assert missing_replies(all_in_english(replies=False), accept_defaults=False) == [
        "help/en",
        "opt_out/en",
    ]


def test_each_language_with_keywords_needs_its_own_reply() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {**OPT_OUT_KEYWORDS, "es": ["ALTO"]},
                "replies": {"en": "Bye.", "fr": "Au revoir."},
            },
            "help": {
                "keywords": {**HELP_KEYWORDS, "es": ["AYUDA"]},
                "replies": {"en": "Help.", "fr": "Aide.", "es": "Ayuda."},
            },
        }
    )
    assert missing_replies(config, accept_defaults=False) == ["opt_out/es"]


def test_a_language_left_with_no_keywords_needs_no_reply() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {"en": [*OPT_OUT_EN_WORDS, *OPT_OUT_FR_WORDS], "fr": []},
                "replies": {"en": "Bye."},
            },
            "help": {
                "keywords": {"en": ["HELP", "INFO", "AIDE"], "fr": []},
                "replies": {"en": "Help."},
            },
        }
    )
    assert missing_replies(config, accept_defaults=False) == []


def test_accepted_defaults_complete_the_builtin_sets() -> None:
    assert missing_replies(KeywordConfig(), accept_defaults=True) == []
    assert missing_replies(all_in_english(replies=False), accept_defaults=True) == []
    extended = config_from(
        {
            "opt_out": {
                "keywords": {
                    "en": [*OPT_OUT_EN_WORDS, "STOPP"],
                    "fr": [*OPT_OUT_FR_WORDS, "ARRETEZ"],
                }
            },
            "help": {"keywords": {"en": ["HELP", "INFO"], "fr": ["AIDE", "AIDEZ-MOI"]}},
        }
    )
    assert missing_replies(extended, accept_defaults=True) == []


def test_accepted_defaults_do_not_cover_a_language_without_one() -> None:
    config = config_from(
        {
            "opt_out": {"keywords": {**OPT_OUT_KEYWORDS, "es": ["ALTO"]}},
            "help": {"keywords": {**HELP_KEYWORDS, "de": ["HILFE"]}},
        }
    )
    assert missing_replies(config, accept_defaults=True) == ["help/de", "opt_out/es"]
    assert missing_replies(config, accept_defaults=False) == [
        "help/de",
        "help/en",
        "help/fr",
        "opt_out/en",
        "opt_out/es",
        "opt_out/fr",
    ]


def test_a_configured_reply_covers_a_language_without_a_default() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {**OPT_OUT_KEYWORDS, "es": ["ALTO"]},
                "replies": {"es": "Baja."},
            },
        }
    )
    assert missing_replies(config, accept_defaults=True) == []


@pytest.mark.parametrize("keywords", [{}, {"en": []}, {"en": [], "fr": []}])
def test_opt_out_keywords_emptied_in_place_are_missing(keywords: dict[str, list[str]]) -> None:
    # Validation refuses such a config (see above); one edited in place is still caught here.
    config = KeywordConfig()
    config.opt_out = CategoryConfig(keywords=keywords, replies={"en": "Bye.", "fr": "Au revoir."})
    assert missing_replies(config, accept_defaults=True) == ["opt_out (no keywords)"]
    assert missing_replies(config, accept_defaults=False) == [
        "help/en",
        "help/fr",
        "opt_out (no keywords)",
    ]


def test_help_keywords_emptied_in_place_are_missing() -> None:
    config = KeywordConfig()
    config.help = CategoryConfig(keywords={})
    assert missing_replies(config, accept_defaults=True) == ["help (no keywords)"]


def test_opt_in_replies_are_not_required() -> None:
    config = config_from(
        {
            "opt_in": {"keywords": {"en": ["START"], "es": ["ALTA"]}},
            "custom": [{"keyword": "HOURS", "reply": "9-5", "language": "de"}],
        }
    )
    assert missing_replies(config, accept_defaults=True) == []
    config = config_from({"opt_in": {"keywords": {}}})
    assert missing_replies(config, accept_defaults=True) == []


# --- reply selection ---------------------------------------------------------------------------


def test_reply_follows_the_language_of_the_keyword() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": OPT_OUT_KEYWORDS,
                "replies": {"en": "You are out.", "fr": "Vous êtes désabonné."},
            },
            "opt_in": {
                "keywords": {"en": ["START", "YES", "UNSTOP"]},
                "replies": {"en": "You are back."},
            },
            "help": {
                "keywords": HELP_KEYWORDS,
                "replies": {"en": "Help text.", "fr": "Texte d'aide."},
            },
        }
    )

    def reply(body: str) -> str:
        match = match_keyword(config, body)
        assert match is not None
        return reply_text(config, match)

    assert reply("stop") == "You are out."
    assert reply("Arrêt") == "Vous êtes désabonné."
    assert reply("désabonner") == "Vous êtes désabonné."
    assert reply("info") == "Help text."
    assert reply("aide") == "Texte d'aide."
    assert reply("unstop") == "You are back."


def test_default_replies_without_configuration() -> None:
    config = KeywordConfig()
    assert reply_text(config, KeywordMatch(OPT_OUT, "STOP", "en")) == OPT_OUT_EN
    assert reply_text(config, KeywordMatch(OPT_OUT, "ARRET", "fr")) == OPT_OUT_FR
    assert reply_text(config, KeywordMatch(OPT_IN, "START", "en")) == OPT_IN_EN
    assert reply_text(config, KeywordMatch(HELP, "HELP", "en")) == HELP_EN
    assert reply_text(config, KeywordMatch(HELP, "AIDE", "fr")) == HELP_FR


def test_a_missing_reply_falls_back_to_the_default_in_the_same_language() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": OPT_OUT_KEYWORDS,
                "replies": {"en": "You are out."},
            }
        }
    )
    assert reply_text(config, KeywordMatch(OPT_OUT, "ARRET", "fr")) == OPT_OUT_FR
    # A French opt-in keyword has no configured reply but a built-in one.
    config = config_from({"opt_in": {"keywords": {"fr": ["REPRENDRE"]}}})
    assert reply_text(config, KeywordMatch(OPT_IN, "REPRENDRE", "fr")) == OPT_IN_FR


def test_a_language_without_any_reply_falls_back_to_a_configured_one_english_first() -> None:
    keywords = {**OPT_OUT_KEYWORDS, "es": ["ALTO"]}
    match = KeywordMatch(OPT_OUT, "ALTO", "es")

    config = config_from(
        {"opt_out": {"keywords": keywords, "replies": {"fr": "Désabonné.", "en": "Out."}}}
    )
    assert reply_text(config, match) == "Out."

    config = config_from(
        {"opt_out": {"keywords": keywords, "replies": {"fr": "Désabonné.", "de": "Abgemeldet."}}}
    )
    assert reply_text(config, match) == "Abgemeldet."  # no English: the first language by code

    config = config_from({"opt_out": {"keywords": keywords}})
    assert reply_text(config, match) == OPT_OUT_EN  # nothing configured: the English default


def test_help_in_a_language_without_any_reply_gets_the_english_default() -> None:
    config = config_from({"help": {"keywords": {**HELP_KEYWORDS, "de": ["HILFE"]}}})
    match = match_keyword(config, "Hilfe!")
    assert match == KeywordMatch(HELP, "HILFE", "de")
    assert reply_text(config, match) == HELP_EN


def test_a_custom_keyword_no_longer_configured() -> None:
    with pytest.raises(LookupError, match="HOURS"):
        reply_text(KeywordConfig(), KeywordMatch(CUSTOM, "HOURS", "en"))


# --- storage as JSON ---------------------------------------------------------------------------


def test_json_round_trip_of_the_defaults() -> None:
    config = KeywordConfig()
    assert KeywordConfig.model_validate(config.model_dump(mode="json")) == config


def test_json_round_trip_of_a_customised_config() -> None:
    config = config_from(
        {
            "opt_out": {
                "keywords": {
                    "en": [*(word.lower() for word in OPT_OUT_EN_WORDS), "stopp"],
                    "fr": ["arrêt", "arrêté", "désabonner"],
                    "es": ["alto"],
                },
                "replies": {"en": "Bye.", "es": "Adiós."},
            },
            "opt_in": {"keywords": {"en": ["START"]}, "replies": {"en": "Welcome back."}},
            "help": {
                "keywords": {"en": ["help", "info", "aide"]},
                "replies": {"en": "Help."},
            },
            "custom": [
                {"keyword": "hours", "reply": HOURS_REPLY},
                {"keyword": "horaires", "reply": "9 h - 17 h", "language": "fr"},
            ],
        }
    )
    stored = json.loads(json.dumps(config.model_dump(mode="json")))
    assert stored == {
        "opt_out": {
            "keywords": {
                "en": [
                    "STOP",
                    "STOPALL",
                    "UNSUBSCRIBE",
                    "CANCEL",
                    "END",
                    "QUIT",
                    "REVOKE",
                    "OPTOUT",
                    "STOPP",
                ],
                "fr": ["ARRET", "ARRETE", "DESABONNER"],
                "es": ["ALTO"],
            },
            "replies": {"en": "Bye.", "es": "Adiós."},
        },
        "opt_in": {"keywords": {"en": ["START"]}, "replies": {"en": "Welcome back."}},
        "help": {"keywords": {"en": ["HELP", "INFO", "AIDE"]}, "replies": {"en": "Help."}},
        "custom": [
            {"keyword": "HOURS", "reply": HOURS_REPLY, "language": "en"},
            {"keyword": "HORAIRES", "reply": "9 h - 17 h", "language": "fr"},
        ],
    }
    assert KeywordConfig.model_validate(stored) == config
