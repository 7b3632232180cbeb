"""Overview: the last 24 hours as charts (server-rendered SVG bars, each with its table)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.console.deps import QuietOperatorDep
from app.console.overview import overview
from app.console.templating import render
from app.web.deps import SessionFactoryDep

router = APIRouter()


@router.get("/overview")
async def overview_page(
    request: Request, operator: QuietOperatorDep, sessions: SessionFactoryDep
) -> HTMLResponse:
    """Messages of the last 24 hours by status, delivery rates, breakers, pauses, the queue."""
    state = request.app.state
    seen = await overview(sessions, state.queue, list(state.providers))
    return render(request, "overview.html", operator=operator, section="overview", seen=seen)
