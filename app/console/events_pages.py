"""Events: failing endpoints, failed and retrying events, and redelivery."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.events_view import (
    failed_events,
    failing_endpoints,
    redeliver_event,
    retrying_events,
)
from app.console.sessions import Operator
from app.console.templating import render, see_other
from app.kernel.errors import Conflict, NotFound, ValidationFailed
from app.kernel.pagination import decode_cursor, encode_cursor
from app.web.deps import SessionDep

router = APIRouter()


async def _page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    *,
    cursor: str | None = None,
    error: str | None = None,
    redelivered: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    try:
        after = decode_cursor(cursor, int) if cursor else None
    except ValidationFailed:
        after, error = None, error or "that page link is not valid any more"
    page = await failed_events(session, after=after)
    return render(
        request,
        "events.html",
        status_code=status_code,
        operator=operator,
        section="events",
        endpoints=await failing_endpoints(session),
        failed=page.events,
        next_cursor=encode_cursor(*page.next_cursor) if page.next_cursor else None,
        retrying=await retrying_events(session),
        error=error,
        redelivered=redelivered,
    )


@router.get("/events")
async def events_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    cursor: str | None = None,
    redelivered: str | None = None,
) -> HTMLResponse:
    """Disabled and failing endpoints, failed events (newest first), events being retried."""
    return await _page(request, session, operator, cursor=cursor, redelivered=redelivered)


@router.post("/events/{event_id}/redeliver")
async def redeliver(
    request: Request, operator: CsrfOperatorDep, session: SessionDep, event_id: uuid.UUID
) -> Response:
    """Send a failed event again now (queued after the commit), with the same id."""
    try:
        await redeliver_event(session, operator.key_id, event_id)
    except (Conflict, NotFound) as refused:
        return await _page(request, session, operator, error=refused.detail, status_code=409)
    return see_other(f"/console/events?redelivered={event_id}")
