"""Conversations: a number and a sender, both directions interleaved (bodies shown only on a
CSRF-checked request, for that request's page only)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse

from app.console.conversations import conversation
from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.numbers import read_number
from app.console.sessions import Operator
from app.console.templating import render
from app.kernel.errors import ValidationFailed
from app.kernel.pagination import decode_cursor, encode_cursor
from app.senders.service import list_senders
from app.web.deps import SessionDep, SettingsDep

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/conversations")
async def conversation_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    phone: str | None = None,
    sender_id: str | None = None,
    before: str | None = None,
) -> HTMLResponse:
    """Pick a number and a sender; see their messages both ways, oldest first, bodies hidden."""
    return await _page(
        request, operator, session, settings.default_region, phone, sender_id, before, show=False
    )


@router.post("/conversations/bodies")
async def show_bodies(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    phone: Annotated[str | None, Form()] = None,
    sender_id: Annotated[str | None, Form()] = None,
    before: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    """The same page with its bodies shown (and the showing logged)."""
    return await _page(
        request, operator, session, settings.default_region, phone, sender_id, before, show=True
    )


async def _page(
    request: Request,
    operator: Operator,
    session: SessionDep,
    default_region: str,
    phone: str | None,
    sender_id: str | None,
    before: str | None,
    *,
    show: bool,
) -> HTMLResponse:
    senders = await list_senders(session)
    number, error = read_number(phone, default_region)
    sender = next((s for s in senders if str(s.id) == sender_id), None)
    if sender_id and sender is None:
        error = error or "no such sender"
    talk, older = None, None
    if number and sender and not error:
        try:
            cursor = decode_cursor(before, uuid.UUID) if before else None
        except ValidationFailed:
            cursor, error = None, "that page link is not valid any more"
        talk = await conversation(session, number, sender.id, before=cursor, show_bodies=show)
        older = encode_cursor(*talk.older) if talk.older else None
        if show:  # bodies are customers' data: who read whose, and which, is on record
            log.info(
                "console: message bodies shown",
                extra={"operator": operator.key_name, "key_id": str(operator.key_id),
                       "phone": number, "sender_id": str(sender.id), "sender": sender.address,
                       "message_ids": [str(t.id) for t in talk.turns
                                       if t.body is not None and not t.is_reply]},
            )  # fmt: skip
    return render(
        request,
        "conversations.html",
        operator=operator,
        section="conversations",
        senders=senders,
        phone=phone or "",
        number=number,
        sender=sender,
        error=error,
        talk=talk,
        older=older,
        before=before if talk else None,
        show=show,
    )
