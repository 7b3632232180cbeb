"""/v1/held-messages (admin): release or cancel what the SMS pumping alarm held.

Held messages are those the alarm stopped with `PUMPING__ACTION=hold` (README, "SMS pumping
defence"); a client lists its own with `GET /v1/messages?status=held`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.events.outbox import EventJob
from app.kernel.errors import Conflict, Forbidden, NotFound, Unauthorized, problem_responses
from app.sending.schemas import MessageOut
from app.traffic.held import Settler, settle_one
from app.traffic.schemas import HeldSelection, HeldSettled
from app.web.deps import AdminDep, SessionDep
from app.web.params import MessageIdPath
from app.worker.queue import enqueue_events

router = APIRouter(prefix="/v1/held-messages", tags=["held-messages"])


async def get_settler(request: Request) -> Settler:
    """Bulk settling, on the app's session factory and queues."""
    state = request.app.state

    async def events(jobs: Sequence[EventJob]) -> int:
        return await enqueue_events(state.queue, jobs)

    return Settler(state.session_factory, state.delivery_batcher.enqueue, events)


SettlerDep = Annotated[Settler, Depends(get_settler)]


@router.post(
    "/{message_id}/release",
    response_model=MessageOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, Conflict),
)
async def release_message(
    message_id: MessageIdPath, session: SessionDep, admin: AdminDep
) -> MessageOut:
    """Release one message the pumping alarm held (admin key): it becomes `queued` and is sent
    as usual (the opt-out check and its validity period apply at send time). 409
    `message_not_held` if it is not held."""
    message = await settle_one(session, message_id, release=True)
    return MessageOut.model_validate(message)


@router.post(
    "/{message_id}/cancel",
    response_model=MessageOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, Conflict),
)
async def cancel_message(
    message_id: MessageIdPath, session: SessionDep, admin: AdminDep
) -> MessageOut:
    """Cancel one message the pumping alarm held (admin key): it becomes `canceled` and is never
    sent (its client gets a `message.canceled` event). 409 `message_not_held` if it is not
    held."""
    message = await settle_one(session, message_id, release=False)
    return MessageOut.model_validate(message)


@router.post(
    "/release",
    response_model=HeldSettled,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def release_client(
    selection: HeldSelection, settler: SettlerDep, admin: AdminDep
) -> HeldSettled:
    """Release every message of a client held before this request, oldest first (admin key;
    the pumping alarm holds messages with `PUMPING__ACTION=hold`)."""
    released = await settler.settle_client(selection.client_id, release=True)
    return HeldSettled(client_id=selection.client_id, released=released)


@router.post(
    "/cancel",
    response_model=HeldSettled,
    responses=problem_responses(Unauthorized, Forbidden, NotFound),
)
async def cancel_client(
    selection: HeldSelection, settler: SettlerDep, admin: AdminDep
) -> HeldSettled:
    """Cancel every message of a client held before this request: none of them is sent."""
    canceled = await settler.settle_client(selection.client_id, release=False)
    return HeldSettled(client_id=selection.client_id, canceled=canceled)
