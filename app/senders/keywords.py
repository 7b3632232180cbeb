"""Inbound keywords: which keyword a message is, and what to answer.

A message matches a keyword only as a whole: both are normalised by `normalize_keyword` (case,
accents, compatibility forms, surrounding punctuation, symbols and spaces ignored) and compared
for equality, so "arrêt!" is ARRET but "please stop texting me" is nothing. Each sender keeps a
`KeywordConfig` (stored as JSON on its row): the opt-out, opt-in and help keyword sets per
language with a reply per language, and custom keywords with their own reply. The module is pure:
no database, no I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from app.kernel.text import StorableStr, reject_nul

Language = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}$")]
"""An ISO 639-1 language code in lower case, such as "en" or "fr"."""

_MAX_REPLY_LENGTH = 1600
# `inbound_messages.keyword` is VARCHAR(64); a longer keyword could match but not be recorded.
_MAX_KEYWORD_LENGTH = 64


class KeywordCategory(StrEnum):
    """What a keyword does: opt the sender out or back in, ask for help, or a custom reply."""

    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"
    CUSTOM = "custom"


BUILTIN_KEYWORDS: Mapping[KeywordCategory, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        KeywordCategory.OPT_OUT: MappingProxyType(
            {
                # The US opt-out list in force since April 2025.
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
            }
        ),
        KeywordCategory.OPT_IN: MappingProxyType({"en": ("START", "YES", "UNSTOP")}),
        KeywordCategory.HELP: MappingProxyType({"en": ("HELP", "INFO"), "fr": ("AIDE",)}),
    }
)
"""The keywords every sender starts with: category -> language -> normalised keywords."""

# Every default reply fits one GSM-7 segment: 160 characters at most, and no ê, ç or curly
# apostrophe, which would force UCS-2 and cut a segment to 70 characters.
DEFAULT_REPLIES: Mapping[KeywordCategory, Mapping[str, str]] = MappingProxyType(
    {
        KeywordCategory.OPT_OUT: MappingProxyType(
            {
                "en": (
                    "You have been unsubscribed and will receive no more messages from us. "
                    "Reply START to resubscribe."
                ),
                "fr": (
                    "Votre désabonnement est confirmé, vous ne recevrez plus de messages de "
                    "notre part. Répondez START pour vous réabonner."
                ),
            }
        ),
        KeywordCategory.OPT_IN: MappingProxyType(
            {
                "en": (
                    "You have been resubscribed and will receive our messages again. "
                    "Reply STOP to unsubscribe or HELP for help."
                ),
                "fr": (
                    "Votre réabonnement est confirmé, vous recevrez à nouveau nos messages. "
                    "Répondez ARRET pour vous désabonner ou AIDE pour de l'aide."
                ),
            }
        ),
        KeywordCategory.HELP: MappingProxyType(
            {
                "en": "To unsubscribe, reply STOP. Message and data rates may apply.",
                "fr": (
                    "Pour vous désabonner, répondez ARRET. Des frais de messagerie texte et de "
                    "données peuvent s'appliquer."
                ),
            }
        ),
    }
)
"""The built-in replies for opt-out, opt-in and help: category -> language -> text."""


_MARKS = frozenset({"Mn", "Me"})  # nonspacing (accents, variation selectors) and enclosing marks


def normalize_keyword(text: str) -> str:
    """The form keywords are compared in: upper case, unaccented, trimmed of punctuation.

    NFKC first (full-width letters and ligatures become plain ones), then case folding to upper
    case, then accents dropped (NFKD without combining marks), then punctuation, symbols (emoji
    included), format characters and whitespace stripped from both ends; inner whitespace runs
    become one space. The result is stable: normalising it again changes nothing.
    """
    folded = unicodedata.normalize("NFKC", text).casefold().upper()
    # Upper-casing can itself produce combining marks (e.g. "ǰ" -> "J̌"), so decompose after it.
    decomposed = unicodedata.normalize("NFKD", folded)
    bare = "".join(char for char in decomposed if unicodedata.category(char) not in _MARKS)
    start, end = 0, len(bare)
    while start < end and _is_edge(bare[start]):
        start += 1
    while end > start and _is_edge(bare[end - 1]):
        end -= 1
    # NFC puts back what NFKD split without dropping anything (Hangul syllables, for one).
    return unicodedata.normalize("NFC", " ".join(bare[start:end].split()))


def _is_edge(char: str) -> bool:
    """Whether `char` is ignored at either end of a message: punctuation, symbol, space, control.

    Format characters (Cf) count too: phones add zero-width spaces, BOMs and direction marks.
    """
    category = unicodedata.category(char)
    return category[0] in "PSZ" or category in ("Cc", "Cf")


def _normalized_keyword(raw: str) -> str:
    """`raw` normalised, or ValueError when nothing or too much is left of it."""
    keyword = normalize_keyword(raw)
    if not keyword:
        raise ValueError(
            f"keyword {raw!r} is empty once case, accents, punctuation and spaces are ignored"
        )
    if len(keyword) > _MAX_KEYWORD_LENGTH:
        raise ValueError(f"keyword {keyword!r} is longer than {_MAX_KEYWORD_LENGTH} characters")
    return keyword


def _not_blank(text: str) -> str:
    """`text` unchanged, or ValueError when it is only whitespace."""
    if not text.strip():
        raise ValueError("a reply cannot be blank")
    return text


_ReplyText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=_MAX_REPLY_LENGTH),
    AfterValidator(_not_blank),
    AfterValidator(reject_nul),
]
"""The text of a keyword reply: 1 to 1600 characters, not only whitespace."""


_KeywordText = Annotated[
    StorableStr,
    Field(min_length=1, description="Compared once case, accents and punctuation are ignored."),
]
"""A keyword as a client writes it; one that is empty once normalised is refused too."""


class CategoryConfig(BaseModel):
    """One built-in category of a sender: its keywords and its reply, both per language."""

    model_config = ConfigDict(extra="forbid")

    keywords: dict[Language, list[_KeywordText]]  # language -> keywords, normalised on validation
    replies: dict[Language, _ReplyText] = Field(default_factory=dict)  # language -> reply text

    @field_validator("keywords")
    @classmethod
    def _normalize_keywords(cls, keywords: dict[str, list[str]]) -> dict[str, list[str]]:
        """Store every keyword in its normalised form."""
        return {
            language: [_normalized_keyword(word) for word in words]
            for language, words in keywords.items()
        }


class CustomKeyword(BaseModel):
    """A sender's own keyword, answered with its own reply (e.g. HOURS -> opening hours)."""

    model_config = ConfigDict(extra="forbid")

    keyword: _KeywordText
    reply: _ReplyText
    language: Language = "en"

    @field_validator("keyword")
    @classmethod
    def _normalize(cls, keyword: str) -> str:
        """Store the keyword in its normalised form."""
        return _normalized_keyword(keyword)


def _builtin(category: KeywordCategory) -> Callable[[], CategoryConfig]:
    """A default factory: the built-in keywords of `category`, without replies."""
    return lambda: CategoryConfig(
        keywords={language: list(words) for language, words in BUILTIN_KEYWORDS[category].items()}
    )


class KeywordConfig(BaseModel):
    """A sender's keywords and replies; the defaults are the built-in sets with no replies.

    A keyword may appear only once in the whole config, so a message matches at most one.
    Edit a config by dumping it, changing the data and validating it again, so that rule holds.
    """

    model_config = ConfigDict(extra="forbid")

    opt_out: CategoryConfig = Field(default_factory=_builtin(KeywordCategory.OPT_OUT))
    opt_in: CategoryConfig = Field(default_factory=_builtin(KeywordCategory.OPT_IN))
    help: CategoryConfig = Field(default_factory=_builtin(KeywordCategory.HELP))
    custom: list[CustomKeyword] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_duplicates(self) -> KeywordConfig:
        """Refuse a keyword that appears twice, naming both places it appears in."""
        seen: dict[str, str] = {}
        for place, keyword, _match in _entries(self):
            if keyword in seen:
                where = (
                    f"in {place}" if seen[keyword] == place else f"in {seen[keyword]} and {place}"
                )
                raise ValueError(f"keyword {keyword!r} appears twice {where}")
            seen[keyword] = place
        return self

    @model_validator(mode="after")
    def _compliance_keywords_kept(self) -> KeywordConfig:
        """The built-in opt-out and help keywords cannot be removed or taken over: a customer
        who texts STOP or ARRET must always be opted out, and HELP or AIDE always answered."""
        for category in _REQUIRED_CATEGORIES:
            present = {
                word for words in _category(self, category).keywords.values() for word in words
            }
            required = {word for words in BUILTIN_KEYWORDS[category].values() for word in words}
            missing = sorted(required - present)
            if missing:
                raise ValueError(
                    f"{category} must keep its built-in keywords; missing: {', '.join(missing)}"
                )
        return self


@dataclass(frozen=True, slots=True)
class KeywordMatch:
    """The keyword an inbound message matched."""

    category: KeywordCategory
    keyword: str  # normalised form, e.g. "ARRET"
    language: str  # the language of the keyword that matched


_BUILTIN_CATEGORIES = (KeywordCategory.OPT_OUT, KeywordCategory.OPT_IN, KeywordCategory.HELP)
# Opt-out and help are what a sender must answer before it may send; opt-in replies are optional.
_REQUIRED_CATEGORIES = (KeywordCategory.OPT_OUT, KeywordCategory.HELP)


def _category(config: KeywordConfig, category: KeywordCategory) -> CategoryConfig:
    """The part of `config` for a built-in `category`."""
    if category is KeywordCategory.OPT_OUT:
        return config.opt_out
    if category is KeywordCategory.OPT_IN:
        return config.opt_in
    if category is KeywordCategory.HELP:
        return config.help
    raise ValueError(f"{category} is not a built-in category")


def _entries(config: KeywordConfig) -> Iterator[tuple[str, str, KeywordMatch]]:
    """Every keyword of `config` as (where it is, keyword, the match it makes), opt-out first."""
    for category in _BUILTIN_CATEGORIES:
        for language, words in _category(config, category).keywords.items():
            for word in words:
                yield f"{category}/{language}", word, KeywordMatch(category, word, language)
    for index, custom in enumerate(config.custom):
        match = KeywordMatch(KeywordCategory.CUSTOM, custom.keyword, custom.language)
        yield f"custom[{index}]", custom.keyword, match


def match_keyword(config: KeywordConfig, body: str) -> KeywordMatch | None:
    """The keyword the whole of `body` is, once normalised, or None."""
    normalized = normalize_keyword(body)
    if not normalized or len(normalized) > _MAX_KEYWORD_LENGTH:
        return None
    # A config holds a few dozen keywords, so a scan costs less than building a lookup would.
    # Opt-out is scanned first: should a config edited in place hold a duplicate, STOP still wins.
    for _place, keyword, match in _entries(config):
        if keyword == normalized:
            return match
    return None


def missing_replies(config: KeywordConfig, *, accept_defaults: bool) -> list[str]:
    """What keeps the sender from sending: "opt_out/fr", "help (no keywords)", ...; [] if nothing.

    Opt-out and help need a reply in every language they have a keyword in, and at least one
    keyword. With `accept_defaults`, a language with a built-in reply counts as answered.
    """
    missing: list[str] = []
    for category in _REQUIRED_CATEGORIES:
        part = _category(config, category)
        languages = [language for language, words in part.keywords.items() if words]
        if not languages:
            missing.append(f"{category} (no keywords)")
            continue
        defaults = DEFAULT_REPLIES[category] if accept_defaults else {}
        missing.extend(
            f"{category}/{language}"
            for language in languages
            if language not in part.replies and language not in defaults
        )
    return sorted(missing)


def reply_text(config: KeywordConfig, match: KeywordMatch) -> str:
    """The reply to send for `match`; opt-out, opt-in and help always get one.

    For those, in order: the configured reply in the keyword's language, the built-in one in that
    language, a configured reply in another language (English first), the built-in English one.
    A custom keyword gets its own reply; LookupError if `config` no longer has that keyword.
    """
    if match.category is KeywordCategory.CUSTOM:
        keyword = normalize_keyword(match.keyword)
        for custom in config.custom:
            if custom.keyword == keyword:
                return custom.reply
        raise LookupError(f"custom keyword {match.keyword!r} is not in this config")
    replies = _category(config, match.category).replies
    defaults = DEFAULT_REPLIES[match.category]
    if match.language in replies:
        return replies[match.language]
    if match.language in defaults:
        return defaults[match.language]
    if replies:
        return replies[min(replies, key=lambda language: (language != "en", language))]
    return defaults["en"]
