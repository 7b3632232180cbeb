"""Events: failing endpoints, failed and retrying events, and redelivery."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.console.deps import CsrfOperatorDep, OperatorDep
from app.console.events_view import (
    failed_events,
    failing_endpoints,
    read_endpoint_cursor,
    redeliver_event,
    retrying_events,
)
from app.console.sessions import Operator
from app.console.templating import render, see_other
from app.kernel.errors import Conflict, NotFound, ValidationFailed
from app.kernel.pagination import decode_cursor, encode_cursor
from app.web.deps import SessionDep

router = APIRouter()


@dataclass(frozen=True, slots=True)
class Cursors:
    """Where each of the page's three lists starts (None: its first page)."""

    failed: str | None = None
    endpoints: str | None = None
    retrying: str | None = None

    def read(self) -> tuple[Any, Any, Any]:
        """The three positions; `ValidationFailed` for a link that is not one of ours."""
        return (
            decode_cursor(self.failed, int) if self.failed else None,
            read_endpoint_cursor(self.endpoints) if self.endpoints else None,
            decode_cursor(self.retrying, int) if self.retrying else None,
        )

    def link(self, **moved: str | None) -> str:
        """The page with one list moved on (`moved`) and the others where they are now."""
        where = {"cursor": self.failed, "endpoints": self.endpoints, "retrying": self.retrying}
        where |= {"cursor" if name == "failed" else name: at for name, at in moved.items()}
        return "/console/events?" + urlencode({name: at for name, at in where.items() if at})


async def _page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    *,
    cursors: Cursors | None = None,
    error: str | None = None,
    redelivered: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    cursors = cursors or Cursors()
    try:
        after, endpoints_after, retrying_after = cursors.read()
    except ValidationFailed:
        after, endpoints_after, retrying_after = None, None, None
        cursors = Cursors()
        error = error or "that page link is not valid any more"
    page = await failed_events(session, after=after)
    endpoints = await failing_endpoints(session, after=endpoints_after)
    retrying = await retrying_events(session, after=retrying_after)
    failed_next = encode_cursor(*page.next_cursor) if page.next_cursor else None
    retrying_next = encode_cursor(*retrying.next_cursor) if retrying.next_cursor else None
    return render(
        request,
        "events.html",
        status_code=status_code,
        operator=operator,
        section="events",
        endpoints=endpoints.endpoints,
        more_endpoints=endpoints.next_cursor and cursors.link(endpoints=endpoints.next_cursor),
        failed=page.events,
        older_failed=failed_next and cursors.link(failed=failed_next),
        retrying=retrying.events,
        later_retries=retrying_next and cursors.link(retrying=retrying_next),
        error=error,
        redelivered=_event_id(redelivered),
    )


def _event_id(value: str | None) -> uuid.UUID | None:
    """The event a redelivery notice names: an event id, else none (the notice never repeats
    what a link was edited to say)."""
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


@router.get("/events")
async def events_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    cursor: str | None = None,
    endpoints: str | None = None,
    retrying: str | None = None,
    redelivered: str | None = None,
) -> HTMLResponse:
    """Disabled and failing endpoints, failed events (newest first), events being retried;
    each list a page at a time."""
    cursors = Cursors(failed=cursor, endpoints=endpoints, retrying=retrying)
    return await _page(request, session, operator, cursors=cursors, redelivered=redelivered)


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
