"""Messages: search, and one message's whole timeline (its body shown only on request)."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.messages import (
    SearchTooSlow,
    choices,
    read_search,
    search_messages,
)
from app.console.sessions import Operator
from app.console.templating import render
from app.console.timeline import message_view
from app.web.deps import SessionDep, SettingsDep

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/messages")
async def search(
    request: Request, operator: OperatorDep, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    """Find messages by number (any format), status, sender, client and time."""
    form = await read_search(session, request.query_params, settings.default_region)
    results, too_slow = None, None
    try:
        results = None if form.errors else await search_messages(session, form)
    except SearchTooSlow as slow:
        too_slow = str(slow)
    return render(
        request,
        "messages.html",
        status_code=422 if form.errors else 503 if too_slow else 200,
        operator=operator,
        section="messages",
        form=form,
        choices=await choices(session),
        results=results,
        too_slow=too_slow,
    )


async def _message_page(
    request: Request, operator: Operator, session: SessionDep, message_id: str, *, body: bool
) -> HTMLResponse:
    try:
        view = await message_view(session, uuid.UUID(message_id), with_body=body)
    except ValueError:
        view = None
    if view is None:
        return render(
            request, "not_found.html", status_code=404, operator=operator, section="messages",
            detail=f"No message with id {message_id}.",
        )  # fmt: skip
    if view.body is not None:
        # Who read which customer's text: the operator's key, never the text itself.
        log.info(
            "message body shown",
            extra={"operator": operator.key_name, "key_id": str(operator.key_id),
                   "message_id": str(view.message.id)},
        )  # fmt: skip
    return render(request, "message.html", operator=operator, section="messages", view=view)


@router.get("/messages/{message_id}")
async def message(
    request: Request, operator: OperatorDep, session: SessionDep, message_id: str
) -> HTMLResponse:
    """One message: its facts and its timeline, the body hidden."""
    return await _message_page(request, operator, session, message_id, body=False)


@router.post("/messages/{message_id}/body")
async def show_body(
    request: Request, operator: CsrfOperatorDep, session: SessionDep, message_id: str
) -> HTMLResponse:
    """The same page with the body shown (and the showing logged)."""
    return await _message_page(request, operator, session, message_id, body=True)
