"""Consent: a number's opt-out state per sender, its history, and an operator's change."""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from app.consent.optouts import OptAction
from app.console.consent_view import consent_view, record_operator_change
from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.numbers import read_number
from app.console.sessions import Operator
from app.console.templating import render, see_other
from app.kernel.errors import NotFound, ValidationFailed
from app.kernel.pagination import decode_cursor, encode_cursor
from app.web.deps import SessionDep, SettingsDep

router = APIRouter()


async def _page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    phone: str | None,
    region: str,
    *,
    error: str | None = None,
    done: str | None = None,
    before: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    number, number_error = read_number(phone, region)
    try:
        older_than = decode_cursor(before, int) if before else None
    except ValidationFailed:
        older_than, error = None, error or "that page link is not valid any more"
    view = await consent_view(session, number, before=older_than) if number else None
    return render(
        request,
        "consent.html",
        status_code=status_code,
        operator=operator,
        section="consent",
        phone=phone or "",
        number=number,
        view=view,
        error=error or number_error,
        done=done,
        older=encode_cursor(*view.older) if view and view.older else None,
    )


@router.get("/consent")
async def consent_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    phone: str | None = None,
    done: str | None = None,
    before: str | None = None,
) -> HTMLResponse:
    """A number's state per sender and service-wide, and its history (a page at a time)."""
    region = settings.default_region
    return await _page(request, session, operator, phone, region, done=done, before=before)


@router.post("/consent")
async def record_change(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    phone: Annotated[str, Form()] = "",
    action: Annotated[str, Form()] = "",
    sender_id: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> Response:
    """Record an opt-out or opt-in with a reason; the actor is the operator's key name."""
    region = settings.default_region
    number, error = read_number(phone, region)
    try:
        wanted = OptAction(action)
        scope = uuid.UUID(sender_id) if sender_id else None
    except ValueError:
        wanted, scope, error = OptAction.OPT_OUT, None, error or "choose an action and a sender"
    if number is None or error:
        error = error or "a number is required"
        return await _page(request, session, operator, phone, region, error=error, status_code=422)
    try:
        result = await record_operator_change(
            session,
            phone=number,
            sender_id=scope,
            action=wanted,
            reason=reason,
            key_name=operator.key_name,
        )
    except (ValidationFailed, NotFound) as refused:
        return await _page(
            request, session, operator, phone, region, error=refused.detail, status_code=422
        )
    done = "recorded" if result.recorded else "unchanged"
    return see_other(f"/console/consent?phone={quote(number)}&done={done}")
