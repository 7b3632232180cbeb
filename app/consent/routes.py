"""/v1/opt-outs: who asked not to be texted, by which sender, and the history of it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from app.access.auth import Principal
from app.consent import optouts as domain
from app.consent.optout_import import import_opt_outs
from app.consent.schemas import (
    ImportLineError,
    OptOutEvent,
    OptOutImportResult,
    OptOutPage,
    OptOutStatus,
    SenderOptOut,
)
from app.db.models import OptOut
from app.events.outbox import is_public_actor
from app.kernel.errors import (
    Forbidden,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    problem_responses,
)
from app.kernel.pagination import decode_cursor, encode_cursor
from app.kernel.phone import E164
from app.senders.service import client_sender_ids, get_owned_sender, get_sender
from app.web.deps import AdminDep, PrincipalDep, SessionDep, SessionFactoryDep, SettingsDep
from app.web.params import LimitQuery, SenderIdQuery, SequenceCursorQuery

router = APIRouter(prefix="/v1/opt-outs", tags=["opt-outs"])

PhonePath = Annotated[
    E164,
    Path(description="The number, in any format; E.164 is safest.", examples=["+14155550123"]),
]
SenderQuery = Annotated[
    uuid.UUID | None,
    Query(
        description="A sender's id; omitted, the service-wide state (admin key) or every sender "
        "of your client (client key).",
        examples=["0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"],
    ),
]


async def _status(
    session: SessionDep, phone: str, sender_id: uuid.UUID | None, principal: Principal
) -> OptOutStatus:
    if not principal.is_admin:
        return await _client_status(session, phone, sender_id, principal)
    if sender_id is not None:
        await get_sender(session, sender_id)  # 404 for an unknown sender
        opted_out = await domain.is_opted_out(session, phone, sender_id)
    else:
        opted_out = await domain.is_opted_out_of_scope(session, phone, None)
    rows = await domain.history(session, phone, sender_id)
    return OptOutStatus(
        phone=phone,
        sender_id=sender_id,
        opted_out=opted_out,
        history=[OptOutEvent.model_validate(row) for row in rows],
    )


async def _client_senders(
    session: SessionDep, sender_id: uuid.UUID | None, principal: Principal
) -> list[uuid.UUID]:
    """The senders a client key acts on: the one it names (404 unless it is the client's, as
    for a sender that does not exist), else every sender of its client."""
    if sender_id is not None:
        await get_owned_sender(session, sender_id, principal.client_id)
        return [sender_id]
    owned = await client_sender_ids(session, principal.client_id)
    if not owned:
        raise ValidationFailed.for_field(
            "no_senders", "sender_id", "your client has no senders: there is nothing to opt out of"
        )
    return owned


async def _client_status(
    session: SessionDep, phone: str, sender_id: uuid.UUID | None, principal: Principal
) -> OptOutStatus:
    """What a client key sees: its senders' states, and the rows that concern them."""
    sender_ids = await _client_senders(session, sender_id, principal)
    states = [
        SenderOptOut(sender_id=owned, opted_out=await domain.is_opted_out(session, phone, owned))
        for owned in sender_ids
    ]
    rows = await domain.history_of_senders(session, phone, sender_ids)
    return OptOutStatus(
        phone=phone,
        sender_id=sender_id,
        opted_out=all(state.opted_out for state in states),
        history=[_as_seen_by(row, principal) for row in rows],
        senders=states if sender_id is None else None,
    )


def _as_seen_by(row: OptOut, principal: Principal) -> OptOutEvent:
    """A history row as a client key sees it: who else acted (another client, an operator) is
    not its business, nor the detail of a service-wide row (it may name another's sender)."""
    event = OptOutEvent.model_validate(row)
    own = row.actor == f"client:{principal.client_name}"
    if not own and not is_public_actor(row.actor):
        event.actor = None
    if row.sender_id is None and not own:
        event.detail = None
    return event


async def _record(
    session: SessionDep,
    phone: str,
    sender_id: uuid.UUID | None,
    action: domain.OptAction,
    principal: Principal,
) -> OptOutStatus:
    """Record the change (a client key: for its own senders only), unless it would change
    nothing: a repeated identical request adds no row."""
    if principal.is_admin:
        if sender_id is not None:
            await get_sender(session, sender_id)  # 404 for an unknown sender
        scopes: list[uuid.UUID | None] = [sender_id]
    else:
        scopes = list(await _client_senders(session, sender_id, principal))
    for scope in scopes:
        await domain.record_change(
            session,
            domain.OptChange(
                phone=phone,
                sender_id=scope,
                action=action,
                source=domain.OptSource.API,
                actor=f"client:{principal.client_name}",
            ),
            seen_from=scope,
            skip_unchanged=True,
        )
    return await _status(session, phone, sender_id, principal)


@router.get(
    "",
    response_model=OptOutPage,
    responses=problem_responses(Unauthorized, Forbidden, ValidationFailed),
)
async def list_opt_outs(
    session: SessionDep,
    _admin: AdminDep,
    phone: Annotated[
        E164 | None, Query(description="Only this number.", examples=["+14155550123"])
    ] = None,
    sender_id: SenderIdQuery = None,
    limit: LimitQuery = 20,
    cursor: SequenceCursorQuery = None,
) -> OptOutPage:
    """Numbers currently opted out (per sender, or service-wide), newest first."""
    rows = await domain.current_opt_outs(
        session,
        phone=phone,
        sender_id=sender_id,
        after=decode_cursor(cursor, int) if cursor else None,
        limit=limit + 1,
    )
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return OptOutPage(
        data=[OptOutEvent.model_validate(row) for row in page],
        has_more=next_cursor is not None,
        next_cursor=next_cursor,
    )


@router.get(
    "/{phone}",
    response_model=OptOutStatus,
    responses=problem_responses(Unauthorized, NotFound, ValidationFailed),
)
async def get_opt_out(
    phone: PhonePath, session: SessionDep, principal: PrincipalDep, sender_id: SenderQuery = None
) -> OptOutStatus:
    """Whether a number is opted out of a sender (admin key: or service-wide, with the whole
    history; client key: of its own senders, with the rows that concern them)."""
    return await _status(session, phone, sender_id, principal)


@router.put(
    "/{phone}",
    response_model=OptOutStatus,
    responses=problem_responses(Unauthorized, NotFound, ValidationFailed),
)
async def put_opt_out(
    phone: PhonePath, session: SessionDep, principal: PrincipalDep, sender_id: SenderQuery = None
) -> OptOutStatus:
    """Record an opt-out: a client key for the sender it names, or for every sender of its
    client; an admin key for one sender or service-wide. Repeating it adds nothing."""
    return await _record(session, phone, sender_id, domain.OptAction.OPT_OUT, principal)


@router.delete(
    "/{phone}",
    response_model=OptOutStatus,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def delete_opt_out(
    phone: PhonePath, session: SessionDep, admin: AdminDep, sender_id: SenderQuery = None
) -> OptOutStatus:
    """Opt a number back in (admin key): recorded as an opt-in; the history stays."""
    return await _record(session, phone, sender_id, domain.OptAction.OPT_IN, admin)


@router.post(
    "/import",
    response_model=OptOutImportResult,
    responses=problem_responses(Unauthorized, Forbidden, ValidationFailed, Unavailable),
)
async def import_csv(
    sessions: SessionFactoryDep,
    admin: AdminDep,
    settings: SettingsDep,
    csv_text: Annotated[
        str,
        Body(
            media_type="text/csv",
            description="One number a line, optionally `,sender address`; header `phone` "
            "allowed. Without a sender the opt-out applies to every sender.",
            examples=["phone,sender\n+14155550123\n(415) 555-0124,+14155550100\n"],
        ),
    ],
) -> OptOutImportResult:
    """Record opt-outs for many numbers, about a thousand per transaction; invalid lines are
    reported, the others recorded (a 503 says from which line on nothing was)."""
    result = await import_opt_outs(
        sessions,
        csv_text,
        actor=f"client:{admin.client_name}",
        default_region=settings.default_region,
    )
    return OptOutImportResult(
        recorded=result.recorded,
        unchanged=result.unchanged,
        errors=[
            ImportLineError(line=e.line, value=e.value, reason=e.reason) for e in result.errors
        ],
    )
