"""Messages: search, and one message's whole timeline."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.console.deps import OperatorDep
from app.console.templating import render

router = APIRouter()


@router.get("/messages")
async def search(request: Request, operator: OperatorDep) -> HTMLResponse:
    """Find messages by number, status, sender, client and time."""
    return render(
        request, "placeholder.html", operator=operator, section="messages", title="Messages"
    )
