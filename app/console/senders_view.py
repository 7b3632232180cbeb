"""Senders as an operator sees them: their keyword sets and replies per language, what each
reply costs to send (encoding, segments), and what is missing before a sender may send.

The rules are app.senders': a changed reply goes through `KeywordConfig` validation (dump,
change, validate, as its docstring asks) and `update_sender`; what is missing is
`missing_replies`; a reply's cost is `analyze_body`, the send path's count.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Sender
from app.kernel.errors import ValidationFailed
from app.senders.keywords import (
    DEFAULT_REPLIES,
    KeywordCategory,
    KeywordConfig,
    missing_replies,
)
from app.senders.service import get_sender, list_senders, update_sender
from app.sending.encoding import analyze_body

BUILTIN_CATEGORIES: Final = (KeywordCategory.OPT_OUT, KeywordCategory.OPT_IN, KeywordCategory.HELP)
# What a reply may be typed up to in the console (the config's own limit).
MAX_REPLY_LENGTH: Final = 1600
_LANGUAGE: Final = re.compile(r"[a-z]{2}")


@dataclass(frozen=True, slots=True)
class ReplyCost:
    """What a text costs to send."""

    encoding: str  # GSM-7 or UCS-2
    segments: int
    units: int  # septets or UTF-16 units
    non_gsm_characters: tuple[str, ...]  # what forced UCS-2


def reply_cost(text: str) -> ReplyCost:
    """The encoding and segment count of `text`, as a send of it would be counted."""
    analysis = analyze_body(text[: MAX_REPLY_LENGTH * 2])
    return ReplyCost(
        encoding=analysis.encoding.value,
        segments=analysis.segments,
        units=analysis.units,
        non_gsm_characters=analysis.non_gsm_characters,
    )


@dataclass(frozen=True, slots=True)
class LanguageReply:
    """A category's keywords and reply in one language."""

    language: str
    keywords: list[str]
    reply: str | None  # configured; None: none set
    default_reply: str | None  # the built-in one, used when none is set (if allowed)
    cost: ReplyCost | None  # of the reply that would be sent


@dataclass(frozen=True, slots=True)
class CategoryView:
    """One built-in category (opt_out, opt_in, help)."""

    category: str
    languages: list[LanguageReply]


@dataclass(frozen=True, slots=True)
class CustomView:
    """A sender's own keyword and its reply."""

    keyword: str
    language: str
    reply: str
    cost: ReplyCost


@dataclass(frozen=True, slots=True)
class SenderSummary:
    """A sender in the list."""

    id: uuid.UUID
    address: str
    kind: str
    provider: str
    fallback_provider: str | None
    description: str | None
    missing: list[str]  # [] when it may send


@dataclass(frozen=True, slots=True)
class SenderDetail:
    """A sender with its keyword sets and replies."""

    summary: SenderSummary
    categories: list[CategoryView]
    custom: list[CustomView]


def _summary(sender: Sender, config: KeywordConfig, accept_defaults: bool) -> SenderSummary:
    return SenderSummary(
        id=sender.id,
        address=sender.address,
        kind=sender.kind,
        provider=sender.provider,
        fallback_provider=sender.fallback_provider,
        description=sender.description,
        missing=missing_replies(config, accept_defaults=accept_defaults),
    )


async def sender_summaries(session: AsyncSession, *, accept_defaults: bool) -> list[SenderSummary]:
    """Every sender (there are few), oldest first, with what keeps it from sending."""
    return [
        _summary(sender, KeywordConfig.model_validate(sender.keywords), accept_defaults)
        for sender in await list_senders(session)
    ]


def _category_view(config: KeywordConfig, category: KeywordCategory) -> CategoryView:
    part = getattr(config, category.value)
    defaults = DEFAULT_REPLIES[category]
    languages = sorted(set(part.keywords) | set(part.replies))
    views = []
    for language in languages:
        reply = part.replies.get(language)
        default = defaults.get(language)
        sent = reply or default
        views.append(
            LanguageReply(
                language=language,
                keywords=list(part.keywords.get(language, [])),
                reply=reply,
                default_reply=default,
                cost=reply_cost(sent) if sent else None,
            )
        )
    return CategoryView(category=category.value, languages=views)


async def sender_detail(
    session: AsyncSession, sender_id: uuid.UUID, *, accept_defaults: bool
) -> SenderDetail:
    """One sender's keyword sets and replies per language (NotFound for an unknown id)."""
    sender = await get_sender(session, sender_id)
    config = KeywordConfig.model_validate(sender.keywords)
    return SenderDetail(
        summary=_summary(sender, config, accept_defaults),
        categories=[_category_view(config, category) for category in BUILTIN_CATEGORIES],
        custom=[
            CustomView(custom.keyword, custom.language, custom.reply, reply_cost(custom.reply))
            for custom in config.custom
        ],
    )


def saved_reply(value: str | None) -> str | None:
    """The `category/language` of a reply just saved, as the page's notice names it; anything
    else (a link edited to say something of its own) names nothing."""
    category, _, language = (value or "").partition("/")
    if category in {c.value for c in BUILTIN_CATEGORIES} and _LANGUAGE.fullmatch(language):
        return f"{category}/{language}"
    return None


async def set_reply(
    session: AsyncSession,
    sender_id: uuid.UUID,
    *,
    category: str,
    language: str,
    reply: str | None,
) -> Sender:
    """Set (or, with an empty `reply`, remove) a built-in category's reply in one language.
    The whole config is validated again, so a reply the API would refuse is refused here with
    the field named. The caller forgets the sender in its cache after the commit."""
    if category not in {c.value for c in BUILTIN_CATEGORIES}:
        raise ValidationFailed.for_field(
            "invalid_keywords", "category", "one of opt_out, opt_in, help"
        )
    if not _LANGUAGE.fullmatch(language):
        raise ValidationFailed.for_field(
            "invalid_keywords", "language", "an ISO 639-1 code in lower case, such as en"
        )
    # Locked before it is read: a concurrent save (of another language, say) waits, then
    # reads what this one wrote, instead of writing back the config it read before.
    sender = await get_sender(session, sender_id, for_update=True)
    data = KeywordConfig.model_validate(sender.keywords).model_dump(mode="json")
    replies = data[category]["replies"]
    if reply is None or not reply.strip():
        replies.pop(language, None)
    else:
        replies[language] = reply
    try:
        config = KeywordConfig.model_validate(data)
    except ValidationError as error:
        reason = "; ".join(str(item["msg"]) for item in error.errors())
        raise ValidationFailed.for_field("invalid_keywords", "reply", reason) from None
    return await update_sender(session, sender_id, provider=None, description=None, keywords=config)
