"""Senders: keyword sets and replies per language, each reply's cost as it is typed, and what
is missing before a sender may send."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.senders_view import (
    MAX_REPLY_LENGTH,
    reply_cost,
    saved_reply,
    sender_detail,
    sender_summaries,
    set_reply,
)
from app.console.sessions import Operator
from app.console.templating import SECURITY_HEADERS, STATIC, render, see_other
from app.db.session import AFTER_COMMIT
from app.kernel.errors import NotFound, ValidationFailed
from app.web.deps import LookupsDep, SessionDep, SettingsDep

router = APIRouter()

_SCRIPT: Final[Path] = STATIC / "replies.js"


@router.get("/static/replies.js")
async def reply_script() -> FileResponse:
    """The reply editor's script: asks /console/senders/reply-cost as the operator types."""
    return FileResponse(_SCRIPT, media_type="text/javascript", headers=SECURITY_HEADERS)


@router.get("/senders")
async def senders_page(
    request: Request, operator: OperatorDep, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    """Every sender and what keeps it from sending."""
    summaries = await sender_summaries(
        session, accept_defaults=settings.accept_default_keyword_replies
    )
    return render(request, "senders.html", operator=operator, section="senders", senders=summaries)


@router.get("/senders/reply-cost")
async def cost(
    operator: OperatorDep, text: Annotated[str, Query(max_length=MAX_REPLY_LENGTH * 2)] = ""
) -> JSONResponse:
    """The encoding and segment count of a text, counted as a send of it would be."""
    counted = reply_cost(text)
    return JSONResponse(
        {
            "encoding": counted.encoding,
            "segments": counted.segments,
            "units": counted.units,
            "non_gsm_characters": list(counted.non_gsm_characters),
        },
        headers=SECURITY_HEADERS,
    )


def _not_found(request: Request, operator: Operator, missing: NotFound) -> HTMLResponse:
    return render(
        request,
        "not_found.html",
        status_code=404,
        operator=operator,
        section="senders",
        detail=missing.detail,
    )


async def _detail_page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    sender_id: uuid.UUID,
    accept_defaults: bool,
    *,
    error: str | None = None,
    saved: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    try:
        detail = await sender_detail(session, sender_id, accept_defaults=accept_defaults)
    except NotFound as missing:
        return _not_found(request, operator, missing)
    return render(
        request,
        "sender.html",
        status_code=status_code,
        operator=operator,
        section="senders",
        detail=detail,
        error=error,
        saved=saved_reply(saved),
        max_reply=MAX_REPLY_LENGTH,
    )


@router.get("/senders/{sender_id}")
async def sender_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    sender_id: uuid.UUID,
    saved: str | None = None,
) -> HTMLResponse:
    """One sender's keywords and replies, per category and language."""
    accept = settings.accept_default_keyword_replies
    return await _detail_page(request, session, operator, sender_id, accept, saved=saved)


@router.post("/senders/{sender_id}/replies")
async def save_reply(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    lookups: LookupsDep,
    sender_id: uuid.UUID,
    category: Annotated[str, Form()] = "",
    language: Annotated[str, Form()] = "",
    reply: Annotated[str, Form()] = "",
) -> Response:
    """Set (or, left empty, remove) a category's reply in one language."""
    accept = settings.accept_default_keyword_replies
    try:
        await set_reply(session, sender_id, category=category, language=language, reply=reply)
    except ValidationFailed as refused:
        return await _detail_page(
            request, session, operator, sender_id, accept, error=refused.detail, status_code=422
        )
    except NotFound as missing:
        return _not_found(request, operator, missing)
    # This process sends with the change once committed; others within the cache's TTL.
    session.info.setdefault(AFTER_COMMIT, []).append(lambda: lookups.forget_sender(sender_id))
    return see_other(f"/console/senders/{sender_id}?saved={category}/{language}")
