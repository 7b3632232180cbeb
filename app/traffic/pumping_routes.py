"""/v1/held-messages (admin): list, release or cancel what the SMS pumping alarm held; and
/v1/clients/{client}/pumping (admin): a client's own alarm settings.

Held messages are those the alarm stopped with `PUMPING__ACTION=hold` (README, "SMS pumping
defence"); a client lists its own with `GET /v1/messages?status=held`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.db.session import AFTER_COMMIT
from app.events.outbox import EventJob
from app.kernel.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    ValidationFailed,
    problem_responses,
)
from app.kernel.settings import PumpingSettings
from app.kernel.text import StorableStr
from app.sending.schemas import MessageOut, MessagePage
from app.traffic.client_settings import client_pumping, set_client_pumping
from app.traffic.held import Settler, list_held, settle_one
from app.traffic.pumping_schemas import (
    ClientPumping,
    HeldSelection,
    HeldSettled,
    PumpingEffective,
    PumpingOverride,
)
from app.traffic.velocity import effective_settings
from app.web.deps import AdminDep, LookupsDep, SessionDep, SettingsDep
from app.web.params import ClientNamePath, CursorQuery, LimitQuery, MessageIdPath
from app.worker.queue import enqueue_events

router = APIRouter(prefix="/v1/held-messages", tags=["held-messages"])


async def get_settler(request: Request) -> Settler:
    """Bulk settling, on the app's session factory and queues."""
    state = request.app.state

    async def events(jobs: Sequence[EventJob]) -> int:
        return await enqueue_events(state.queue, jobs)

    return Settler(state.session_factory, state.delivery_batcher.enqueue, events)


SettlerDep = Annotated[Settler, Depends(get_settler)]


ClientQuery = Annotated[
    StorableStr,
    Query(min_length=1, max_length=200, description="The client's name.", examples=["shop"]),
]


@router.get(
    "",
    response_model=MessagePage,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def list_held_messages(
    client: ClientQuery,
    session: SessionDep,
    admin: AdminDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> MessagePage:
    """A client's messages the pumping alarm holds, newest first, one page at a time (admin
    key). 404 `client_not_found` for no client of that name."""
    page = await list_held(session, client, limit=limit, cursor=cursor)
    return MessagePage(
        data=[MessageOut.model_validate(message) for message in page.items],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )


@router.post(
    "/{message_id}/release",
    response_model=MessageOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, Conflict, ValidationFailed),
)
async def release_message(
    message_id: MessageIdPath, session: SessionDep, admin: AdminDep
) -> MessageOut:
    """Release one message the pumping alarm held (admin key): it becomes `queued` and is sent
    as usual (the opt-out check and its validity period apply at send time), or `scheduled`
    while its `send_at` is ahead. 409 `message_not_held` if it is not held."""
    message = await settle_one(session, message_id, release=True)
    return MessageOut.model_validate(message)


@router.post(
    "/{message_id}/cancel",
    response_model=MessageOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, Conflict, ValidationFailed),
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
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def release_client(
    selection: HeldSelection, settler: SettlerDep, admin: AdminDep
) -> HeldSettled:
    """Release every message of a client held before this request, oldest first (admin key;
    the pumping alarm holds messages with `PUMPING__ACTION=hold`)."""
    released = await settler.settle_client(selection.client, release=True)
    return HeldSettled(client=selection.client, released=released)


@router.post(
    "/cancel",
    response_model=HeldSettled,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def cancel_client(
    selection: HeldSelection, settler: SettlerDep, admin: AdminDep
) -> HeldSettled:
    """Cancel every message of a client held before this request: none of them is sent."""
    canceled = await settler.settle_client(selection.client, release=False)
    return HeldSettled(client=selection.client, canceled=canceled)


clients_router = APIRouter(prefix="/v1/clients", tags=["held-messages"])


def _client_pumping(
    client_id: uuid.UUID, own: dict[str, Any] | None, settings: PumpingSettings
) -> ClientPumping:
    in_effect = effective_settings(settings, own)
    return ClientPumping(
        client_id=client_id,
        own=PumpingOverride.model_validate(own) if own else None,
        effective=PumpingEffective.model_validate(in_effect.model_dump()),
    )


@clients_router.get(
    "/{client_name}/pumping",
    response_model=ClientPumping,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def get_client_pumping(
    client_name: ClientNamePath, session: SessionDep, settings: SettingsDep, admin: AdminDep
) -> ClientPumping:
    """A client's SMS pumping alarm settings: its own (set by an admin) and those in effect
    (admin key)."""
    client_id, own = await client_pumping(session, client_name)
    return _client_pumping(client_id, own, settings.pumping)


@clients_router.put(
    "/{client_name}/pumping",
    response_model=ClientPumping,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def put_client_pumping(
    client_name: ClientNamePath,
    body: PumpingOverride,
    session: SessionDep,
    settings: SettingsDep,
    lookups: LookupsDep,
    admin: AdminDep,
) -> ClientPumping:
    """Set a client's own SMS pumping alarm settings (admin key): its action (`off`, `alert`,
    `hold`), minimum count and multiple; a null field takes the service's, an empty body
    clears them. Other API processes see the change within `LOOKUP_CACHE_SECONDS`."""
    client_id, own = await set_client_pumping(session, client_name, body.model_dump())
    # Forgotten once the change is committed (before, a concurrent read could cache the old).
    session.info.setdefault(AFTER_COMMIT, []).append(lookups.forget_all)
    return _client_pumping(client_id, own, settings.pumping)
