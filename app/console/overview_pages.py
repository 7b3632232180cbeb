"""Overview: the last 24 hours as charts (server-rendered SVG bars, each with its table)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from app.console.deps import SignInRequired
from app.console.overview import overview
from app.console.sessions import COOKIE, Operator, signed_in
from app.console.templating import render
from app.web.deps import SessionFactoryDep

router = APIRouter()


async def operator_without_transaction(request: Request, sessions: SessionFactoryDep) -> Operator:
    """The signed-in operator, looked up in a transaction of its own that ends here: the page
    then reads Redis, and no network call may run while a transaction is open."""
    async with sessions.begin() as session:
        operator = await signed_in(session, request.cookies.get(COOKIE))
    if operator is None:
        raise SignInRequired(request.url.path)
    return operator


QuietOperatorDep = Annotated[Operator, Depends(operator_without_transaction)]


@router.get("/overview")
async def overview_page(
    request: Request, operator: QuietOperatorDep, sessions: SessionFactoryDep
) -> HTMLResponse:
    """Messages of the last 24 hours by status, delivery rates, breakers, pauses, the queue."""
    state = request.app.state
    seen = await overview(sessions, state.queue, list(state.providers))
    return render(request, "overview.html", operator=operator, section="overview", seen=seen)
