"""Opt-out state: a history of rows (pruned only when RETENTION__OPT_OUT_HISTORY_DAYS is set,
never the row that decides); the newest row for (phone, sender) decides, and a row without a
sender applies to every sender. `opt_out_states` holds that newest row per scope, kept by a
trigger in the statement of each history insert: lists read it.

Every change takes a transaction-scoped advisory lock on the phone number, and so does the
worker's last check before sending (`lock_recipient`): a STOP and a send to the same number are
serialised, so no send is claimed after a STOP was recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from sqlalchemy import ColumnElement, and_, not_, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.db.models import OptOut, OptOutState
from app.events.outbox import emit_opt_out_changed


class OptAction(StrEnum):
    """What a history row records."""

    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"


class OptSource(StrEnum):
    """How the change came about."""

    KEYWORD = "keyword"
    API = "api"
    IMPORT = "import"
    PROVIDER_ERROR = "provider_error"


# Numbers share this many locks: a bulk import of 100,000 numbers must take a bounded number of
# advisory locks (each uses a slot of PostgreSQL's shared lock table); two numbers in one bucket
# only wait for each other briefly.
LOCK_BUCKETS: Final = 1024
_LOCK_NAMESPACE: Final = 0x534D5300  # keeps our keys apart from other advisory locks ("SMS\0")

# A number's lock key, in SQL (`{phone}`: the expression of the number): the first 8 bytes of
# sha256("recipient:" + number) taken modulo the buckets, in our namespace. Computed by the
# database, so a statement can find its recipients and lock them in one round trip (the claim).
RECIPIENT_LOCK_KEY_SQL: Final = (
    f"({_LOCK_NAMESPACE} + (('x' || left(encode(sha256(convert_to('recipient:' || {{phone}}, "
    f"'UTF8')), 'hex'), 16))::bit(64)::bigint & {LOCK_BUCKETS - 1}))"
)

# Lock the numbers `{phones}` (a query of one column, `phone`) yields: each key once, in
# ascending order (the one order everywhere: no deadlocks). One row: how many keys were taken.
RECIPIENT_LOCKS_SQL: Final = f"""(
    SELECT count(*) AS locked FROM (
        SELECT pg_advisory_xact_lock(key) FROM (
            SELECT DISTINCT {RECIPIENT_LOCK_KEY_SQL.format(phone="wanted.phone")} AS key
            FROM ({{phones}}) AS wanted
            ORDER BY key
        ) AS keys
    ) AS taken
)"""


async def lock_recipients(session: AsyncSession, phones: Iterable[str]) -> None:
    """Serialise opt-out changes and sends for these numbers until the transaction ends."""
    numbers = sorted(set(phones))
    if numbers:
        await session.execute(
            text(
                "SELECT locked FROM "
                + RECIPIENT_LOCKS_SQL.format(
                    phones="SELECT unnest(CAST(:phones AS text[])) AS phone"
                )
                + " AS held"
            ),
            {"phones": numbers},
        )


async def _deciding_row(
    session: AsyncSession, phone: str, sender_id: uuid.UUID | None, *, with_service_wide: bool
) -> tuple[str, str] | None:
    """(action, source) of the newest row that decides the state, if any."""
    scope: ColumnElement[bool]
    if sender_id is None:
        scope = OptOut.sender_id.is_(None)
    elif with_service_wide:
        scope = (OptOut.sender_id == sender_id) | OptOut.sender_id.is_(None)
    else:
        scope = OptOut.sender_id == sender_id
    row = (
        await session.execute(
            select(OptOut.action, OptOut.source)
            .where(OptOut.phone == phone, scope)
            .order_by(OptOut.created_at.desc(), OptOut.id.desc())
            .limit(1)
        )
    ).first()
    return (row[0], row[1]) if row else None


async def is_opted_out(session: AsyncSession, phone: str, sender_id: uuid.UUID) -> bool:
    """True when `phone` opted out of this sender, or of every sender, and has not opted back in.

    The newest row among the sender's own and the service-wide rows wins, so a START to one sender
    after a service-wide STOP re-allows that sender (the customer asked it directly).
    """
    row = await _deciding_row(session, phone, sender_id, with_service_wide=True)
    return row is not None and row[0] == OptAction.OPT_OUT


# `is_opted_out`'s rule as an SQL condition on a (phone, sender id) pair, for statements written
# in SQL (the send path's, on asyncpg): the newest of the sender's own and the service-wide rows
# decides. Format it with the `phone` and `sender_id` expressions.
OPTED_OUT_SQL: Final = """(
    SELECT deciding.action = 'opt_out' FROM opt_outs AS deciding
    WHERE deciding.phone = {phone}
        AND (deciding.sender_id = {sender_id} OR deciding.sender_id IS NULL)
    ORDER BY deciding.created_at DESC, deciding.id DESC
    LIMIT 1
) IS TRUE"""


async def opted_out_pairs(
    session: AsyncSession, pairs: Collection[tuple[str, uuid.UUID]]
) -> set[tuple[str, uuid.UUID]]:
    """The (phone, sender id) pairs among `pairs` that `is_opted_out` refuses, in one query: a
    batch checks up to 1,000 pairs, and one round trip each would cost more than the rest."""
    if not pairs:
        return set()
    condition = OPTED_OUT_SQL.format(phone="wanted.phone", sender_id="wanted.sender_id")
    rows = await session.execute(
        text(
            "SELECT phone, sender_id FROM unnest(CAST(:phones AS text[]), CAST(:sender_ids AS "
            f"uuid[])) AS wanted(phone, sender_id) WHERE {condition}"
        ),
        {
            "phones": [phone for phone, _ in pairs],
            "sender_ids": [sender_id for _, sender_id in pairs],
        },
    )
    return {(phone, sender_id) for phone, sender_id in rows}


async def is_opted_out_of_scope(
    session: AsyncSession, phone: str, sender_id: uuid.UUID | None
) -> bool:
    """The state of one scope: a sender's own rows or service-wide rows (when `sender_id` is
    None) only, without the other scope's rows."""
    row = await _deciding_row(session, phone, sender_id, with_service_wide=False)
    return row is not None and row[0] == OptAction.OPT_OUT


@dataclass(frozen=True, slots=True)
class OptChange:
    """One change to record."""

    phone: str
    sender_id: uuid.UUID | None  # None: every sender
    action: OptAction
    source: OptSource
    actor: str
    detail: str | None = None


# Whether a wanted change (`wanted`: phone, sender_id, action) would alter some sender's state,
# judged on the current states (`opt_out_states`): seen from its sender, the newest of the
# sender's own and the service-wide states differs from it; a service-wide change has no effect
# only when the number's newest state of any scope is a service-wide one with the same action
# (then every sender already is in that state), or when it opts in a number never recorded.
_HAS_EFFECT_SQL: Final = """CASE WHEN wanted.sender_id IS NOT NULL THEN COALESCE((
        SELECT state.action FROM opt_out_states AS state
        WHERE state.phone = wanted.phone
            AND (state.sender_id = wanted.sender_id OR state.sender_id IS NULL)
        ORDER BY state.changed_at DESC, state.history_id DESC LIMIT 1
    ), 'opt_in') <> wanted.action
    ELSE NOT COALESCE((
        SELECT state.sender_id IS NULL AND state.action = wanted.action
        FROM opt_out_states AS state WHERE state.phone = wanted.phone
        ORDER BY state.changed_at DESC, state.history_id DESC LIMIT 1
    ), wanted.action = 'opt_in')
END"""

# History rows (a trigger moves their scopes' current states in `opt_out_states`, in the same
# statement: see the OptOutState model). `created_at` is the time of the insert, under the
# lock, not of the transaction's start (now()): the newest row decides, so rows must be ordered
# as the lock serialised them. One row: how many history rows were added.
_WRITE_HISTORY_SQL: Final = """
WITH wanted AS (
    SELECT * FROM unnest(
        CAST(:phones AS text[]), CAST(:sender_ids AS uuid[]), CAST(:actions AS text[]),
        CAST(:sources AS text[]), CAST(:actors AS text[]), CAST(:details AS text[])
    ) WITH ORDINALITY AS wanted(phone, sender_id, action, source, actor, detail, n)
), added AS (
    INSERT INTO opt_outs (phone, sender_id, action, source, actor, detail, created_at)
    SELECT phone, sender_id, action, source, actor, detail, clock_timestamp()
    FROM wanted WHERE {condition} ORDER BY n
    RETURNING id
)
SELECT count(*) FROM added
"""


async def _write_history(
    session: AsyncSession, changes: Sequence[OptChange], *, only_effective: bool = False
) -> int:
    """Add history rows for `changes` (the caller holds their numbers' locks), which moves their
    scopes' current states; with `only_effective`, changes that would alter no sender's state
    add nothing. How many rows were added."""
    sql = _WRITE_HISTORY_SQL.format(condition=_HAS_EFFECT_SQL if only_effective else "true")
    added = await session.scalar(
        text(sql),
        {
            "phones": [change.phone for change in changes],
            "sender_ids": [change.sender_id for change in changes],
            "actions": [change.action.value for change in changes],
            "sources": [change.source.value for change in changes],
            "actors": [change.actor for change in changes],
            "details": [change.detail for change in changes],
        },
    )
    return int(added or 0)


async def record_provider_opt_out(
    session: AsyncSession,
    *,
    phone: str,
    sender_id: uuid.UUID,
    provider: str,
    code: str | None,
    detail: str | None,
) -> None:
    """The provider refused a send because the recipient opted out there: record it here too,
    for that sender (the provider refused that pair of numbers, whatever OPT_OUT_SCOPE says).

    Providers repeat callbacks, and every message queued before the opt-out fails the same way:
    only a report that changes the sender's state adds a row (and an event)."""
    await record_change(
        session,
        OptChange(
            phone=phone,
            sender_id=sender_id,
            action=OptAction.OPT_OUT,
            source=OptSource.PROVIDER_ERROR,
            actor=f"provider:{provider}",
            detail=f"{provider} error {code}: {detail}",
        ),
        skip_unchanged=True,
    )


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """What recording a change did, seen from one sender (or one scope)."""

    changed: bool  # the state is different now
    previous_source: str | None  # how the state before it came about (None: never recorded)
    recorded: bool = True  # False: `skip_unchanged` and the change would have had no effect


async def record_change(
    session: AsyncSession,
    change: OptChange,
    *,
    seen_from: uuid.UUID | None = None,
    skip_unchanged: bool = False,
) -> ChangeResult:
    """Record an opt-out or opt-in, and say whether it changed the state seen from `seen_from`.

    `seen_from` is the sender whose effective state decides "changed" (a STOP to sender A stored
    service-wide changes A's state only if A was not already opted out); by default the scope's.
    With `skip_unchanged`, a change that would alter no sender's state (a repeated PUT, a START
    from a number that is not opted out) adds no row.
    """
    await lock_recipients(session, [change.phone])
    if seen_from is not None:
        previous = await _deciding_row(session, change.phone, seen_from, with_service_wide=True)
    else:
        previous = await _deciding_row(
            session, change.phone, change.sender_id, with_service_wide=False
        )
    before = previous is not None and previous[0] == OptAction.OPT_OUT
    changed = before != (change.action is OptAction.OPT_OUT)
    previous_source = previous[1] if previous else None
    if skip_unchanged and not await _has_effect(session, change, seen_from):
        return ChangeResult(changed=False, previous_source=previous_source, recorded=False)
    await _write_history(session, [change])
    if changed:  # events out: the sender's endpoint hears of it (after commit)
        await emit_opt_out_changed(
            session,
            phone=change.phone,
            sender_id=change.sender_id,
            action=change.action.value,
            source=change.source.value,
            actor=change.actor,
            detail=change.detail,
        )
    return ChangeResult(changed=changed, previous_source=previous_source)


async def _has_effect(
    session: AsyncSession, change: OptChange, seen_from: uuid.UUID | None
) -> bool:
    """Whether recording `change` now would alter any sender's state (under the number's lock).

    Seen from one sender (the change's own, or `seen_from`): whether that sender's state, the
    newest of its own and the service-wide rows, differs from the change's. A service-wide change
    seen from no sender has no effect only when the number's newest row of any scope is a
    service-wide one with the same action (then every sender already is in that state), or when
    it is an opt-in of a number with no rows at all.
    """
    opting_out = change.action is OptAction.OPT_OUT
    view = seen_from or change.sender_id
    if view is not None:
        row = await _deciding_row(session, change.phone, view, with_service_wide=True)
        return (row is not None and row[0] == OptAction.OPT_OUT) != opting_out
    newest = (
        await session.execute(
            select(OptOut.action, OptOut.sender_id)
            .where(OptOut.phone == change.phone)
            .order_by(OptOut.created_at.desc(), OptOut.id.desc())
            .limit(1)
        )
    ).first()
    if newest is None:
        return opting_out
    return not (newest[1] is None and newest[0] == change.action.value)


async def record_changes(session: AsyncSession, changes: Sequence[OptChange]) -> int:
    """Record many changes in one statement (a chunk of a bulk import), under the numbers'
    locks, skipping those that would change nothing (a number already opted out, a file sent
    again): how many were recorded. Keep `changes` to about a thousand: the transaction holds
    the locks of every number in it."""
    if not changes:
        return 0
    await lock_recipients(session, [change.phone for change in changes])
    return await _write_history(session, changes, only_effective=True)


async def history(
    session: AsyncSession, phone: str, sender_id: uuid.UUID | None = None
) -> list[OptOut]:
    """Every row for a number (or for one sender of it, with the service-wide rows), newest
    first."""
    query = select(OptOut).where(OptOut.phone == phone)
    if sender_id is not None:
        query = query.where(or_(OptOut.sender_id == sender_id, OptOut.sender_id.is_(None)))
    return list(await session.scalars(query.order_by(OptOut.created_at.desc(), OptOut.id.desc())))


async def history_of_senders(
    session: AsyncSession, phone: str, sender_ids: Collection[uuid.UUID]
) -> list[OptOut]:
    """The rows for a number of these senders and the service-wide ones, newest first."""
    query = select(OptOut).where(
        OptOut.phone == phone, or_(OptOut.sender_id.in_(sender_ids), OptOut.sender_id.is_(None))
    )
    return list(await session.scalars(query.order_by(OptOut.created_at.desc(), OptOut.id.desc())))


async def current_opt_outs(
    session: AsyncSession,
    *,
    phone: str | None,
    sender_id: uuid.UUID | None,
    after: tuple[datetime, int] | None,
    limit: int,
) -> list[OptOut]:
    """The scopes (a number and a sender, or a number service-wide) that are opted out, as the
    send check sees them, newest first; `after` is the (created_at, id) of the last row of the
    page before. Read from the current states (an index in the list's order), not the history."""
    state = aliased(OptOutState)
    # A sender's opt-out no longer holds once a newer service-wide opt-in exists: list what the
    # send check would refuse, nothing more.
    service_wide = aliased(OptOutState)
    newer_opt_in = (
        select(service_wide.id)
        .where(
            service_wide.phone == state.phone,
            service_wide.sender_id.is_(None),
            service_wide.action == OptAction.OPT_IN.value,
            tuple_(service_wide.changed_at, service_wide.history_id)
            > tuple_(state.changed_at, state.history_id),
        )
        .exists()
    )
    # Inside NOT (... AND ...), the check stays a per-row probe of the unique index for the
    # rows of the page, never a join over every service-wide opt-in.
    lifted = and_(state.sender_id.is_not(None), newer_opt_in)
    query = (
        select(OptOut)
        .join(state, state.history_id == OptOut.id)
        .where(state.action == OptAction.OPT_OUT.value, not_(lifted))
    )
    if phone is not None:
        query = query.where(state.phone == phone)
    if sender_id is not None:
        query = query.where(state.sender_id == sender_id)
    if after is not None:
        query = query.where(tuple_(state.changed_at, state.history_id) < tuple_(*after))
    query = query.order_by(state.changed_at.desc(), state.history_id.desc()).limit(limit)
    return list(await session.scalars(query))
