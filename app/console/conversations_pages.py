"""Conversations: a number and a sender, both directions interleaved."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.console.conversations import conversation
from app.console.deps import OperatorDep
from app.console.numbers import read_number
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
    show: bool = False,
) -> HTMLResponse:
    """Pick a number and a sender; see their messages both ways, oldest first."""
    senders = await list_senders(session)
    number, error = read_number(phone, settings.default_region)
    sender = next((s for s in senders if str(s.id) == sender_id), None)
    if sender_id and sender is None:
        error = error or "no such sender"
    talk, older = None, None
    if number and sender and not error:
        try:
            cursor = decode_cursor(before, uuid.UUID) if before else None
        except ValidationFailed:
            cursor, error = None, "that page link is not valid any more"
        if show:  # bodies are customers' data: who read them is on record
            log.info(
                "console: message bodies shown",
                extra={"operator": operator.key_name, "sender_id": str(sender.id)},
            )
        talk = await conversation(session, number, sender.id, before=cursor, show_bodies=show)
        older = encode_cursor(*talk.older) if talk.older else None
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
        show=show,
    )
