"""The changes of a message's state that follow its acceptance, and how their transactions run.

Every change here is conditional (it matches only while the message is where the change expects
it, so duplicates and races are harmless) and takes its locks in the one order used everywhere:
the recipient's advisory lock (app.consent.optouts.lock_recipients) first, then the message row.
Timestamps come from the database's clock.

`run_transaction` runs a whole unit of work in a fresh transaction and runs it again, a bounded
number of times, when PostgreSQL aborts it for a deadlock (40P01) or a serialization failure
(40001): such an abort is about timing, not about the work, and the caller (a provider's status
callback, which is never sent again; a worker's record of a provider's answer) has nobody to
pass it on to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.consent.optouts import (
    OPTED_OUT_SQL,
    RECIPIENT_LOCKS_SQL,
    lock_recipients,
    record_provider_opt_out,
)
from app.db.models import Message, MessageEvent
from app.db.session import (
    ENQUEUE_AFTER_COMMIT,
    SessionFactory,
    Tx,
    raw_statement,
    raw_transaction,
    sqlstate_of,
)
from app.delivery.parts import (
    Settlement,
    apply_part_report,
    record_accepted_parts,
)
from app.events.outbox import (
    EVENTS_AFTER_COMMIT,
    MAY_NOTIFY_SQL,
    EventJob,
    emit_message_status,
    emit_message_statuses,
    scheduled,
)
from app.kernel.errors import NotFound
from app.kernel.logs import message_id_var
from app.kernel.metrics import count_status
from app.kernel.status import MessageStatus, can_advance, statuses_before
from app.kernel.text import storable, storable_mapping
from app.providers.base import StatusReport

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the same transaction, run again, may well succeed.
RETRYABLE_SQLSTATES: Final = frozenset({"40P01", "40001"})  # deadlock, serialization failure
# How many times a unit of work runs at most; between runs a short random pause (seconds, times
# the run's number) lets the transaction that won finish first.
TRANSACTION_ATTEMPTS: Final = 5
RETRY_PAUSE_SECONDS: Final = 0.02

# The only messages sent to a recipient who opted out: the confirmation of that opt-out, and the
# answer to HELP (which is always answered).
PASSES_OPT_OUT = frozenset({"opt_out_confirmation", "help_reply"})
# A job may start a little before the time it was deferred to (clocks, rounding): that is due.
NOT_DUE_TOLERANCE_SECONDS: Final = 0.1


def is_retryable(error: BaseException) -> bool:
    """Whether PostgreSQL aborted the transaction for its timing (deadlock, serialization)."""
    return sqlstate_of(error) in RETRYABLE_SQLSTATES


async def run_transaction(
    session_factory: SessionFactory,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = TRANSACTION_ATTEMPTS,
) -> tuple[T, tuple[EventJob, ...]]:
    """Run `work` in a transaction and commit; run it again in a new one after a deadlock or a
    serialization failure (at most `attempts` runs). Returns its result and the event deliveries
    the committed transaction scheduled (to enqueue after the commit)."""

    async def once() -> tuple[T, tuple[EventJob, ...]]:
        async with session_factory.begin() as session:
            result = await work(session)
        return result, scheduled(session)

    return await _retrying(once, attempts)


async def run_raw_transaction(
    session_factory: SessionFactory,
    work: Callable[[Tx], Awaitable[T]],
    *,
    attempts: int = TRANSACTION_ATTEMPTS,
) -> tuple[T, tuple[EventJob, ...]]:
    """`run_transaction` for the hot state changes: `work` speaks plain asyncpg (`Tx.fetch`),
    and an ORM session inside the same transaction (`Tx.session()`) where it needs one."""

    async def once() -> tuple[T, tuple[EventJob, ...]]:
        async with raw_transaction(session_factory) as (tx, info):
            result = await work(tx)
        return result, tuple(info.get(EVENTS_AFTER_COMMIT, ()))

    return await _retrying(once, attempts)


async def _retrying(once: Callable[[], Awaitable[T]], attempts: int) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return await once()
        except Exception as error:
            if attempt == attempts or not is_retryable(error):
                raise
            log.warning(
                "transaction aborted by the database; running it again",
                extra={"attempt": attempt, "error": str(error)[:200]},
            )
            await asyncio.sleep(random.uniform(0.5, 1.0) * RETRY_PAUSE_SECONDS * attempt)
    raise AssertionError("unreachable")  # the last attempt returns or raises


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one message in a delivery run; `retry_in` is set when it must run
    again later, and `events` are the event deliveries its committed transactions wrote."""

    status: MessageStatus | None
    retry_in: float | None = None
    events: tuple[EventJob, ...] = ()


@dataclass(frozen=True, slots=True)
class SenderTerms:
    """What the delivery gate needs of a claimed message's sender: its rate, its fallback."""

    rate: float
    fallback_provider: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim did: the messages now `sending` (this attempt), and an outcome for every
    other id (nothing to do, not due yet, expired, canceled for an opt-out); the claimed
    messages' senders' terms, read with them."""

    claimed: list[Message]
    outcomes: dict[uuid.UUID, Outcome] = field(default_factory=dict)
    senders: dict[uuid.UUID, SenderTerms] = field(default_factory=dict)


# The claim's read: every column of the messages (as `_message` builds them) and their senders'
# terms, with the database's now; and, in the same statement, the locks of the queued ones'
# recipients (their order: `optouts.RECIPIENT_LOCKS_SQL`), held until the claim commits.
_COLUMNS: Final = tuple((p.key, p.columns[0].name) for p in Message.__mapper__.column_attrs)
_QUEUED_RECIPIENTS: Final = """SELECT "to" AS phone FROM found WHERE status = 'queued'"""
_READ_AND_LOCK: Final = f"""
WITH found AS (
    SELECT {", ".join(f'm."{name}"' for _, name in _COLUMNS)},
        s.rate_per_second, s.fallback_provider
    FROM messages AS m JOIN senders AS s ON s.id = m.sender_id
    WHERE m.id = ANY($1::uuid[])
), held AS MATERIALIZED {RECIPIENT_LOCKS_SQL.format(phones=_QUEUED_RECIPIENTS)}
SELECT found.*, now() FROM found, held
"""


def _message(row: Any) -> Message:
    """A message read by `_READ_AND_LOCK`, as an object outside any session (the ORM's would
    cost more than the read): changes go through the conditional statements here, never it."""
    return Message(**{key: row[i] for i, (key, _) in enumerate(_COLUMNS)})


async def claim(tx: Tx, message_ids: Collection[uuid.UUID]) -> Claim:
    """Move 1..N queued, due messages to `sending` (attempts + 1, `claimed_at` the database's
    now), in the caller's transaction; the road of what `claim_messages` leaves over (expired
    and opted-out messages, ended here through the ORM for the events they write).

    The recipients' locks are taken first, then the opt-out check: a STOP recorded before this
    point is seen, and one recorded after it finds the message already claimed. An expired
    message ends `expired` and an opted-out one `canceled`, here. Two statements in the common
    case: the read with the locks (`_READ_AND_LOCK`), then one statement for the opt-out check,
    the claim and its history rows (`_CLAIM`), whose snapshot follows the locks.
    """
    rows = await tx.fetch(_READ_AND_LOCK, list(message_ids))
    outcomes: dict[uuid.UUID, Outcome] = dict.fromkeys(message_ids, Outcome(None))
    if not rows:
        return Claim([], outcomes)
    terms = len(_COLUMNS)
    now: datetime = rows[0][terms + 2]
    senders = {row["sender_id"]: SenderTerms(row[terms], row[terms + 1]) for row in rows}
    # The queued ones' recipients are locked (by the read): the one lock order, recipients
    # first, before any row is changed (an expired one too).
    queued = [_message(row) for row in rows if row["status"] == MessageStatus.QUEUED.value]
    if not queued:
        return Claim([], outcomes)
    candidates = []
    unsent: list[tuple[Message, MessageStatus, str, str | None]] = []
    for message in queued:
        if _expired(message, now):
            reason = "validity period ended before sending"
            unsent.append((message, MessageStatus.EXPIRED, reason, None))
        elif (wait := _not_due_for(message, now)) is not None:
            outcomes[message.id] = Outcome(MessageStatus.QUEUED, retry_in=wait)
        else:
            candidates.append(message)
    claimed, refused = await _claim_rows(tx, candidates)
    for message in candidates:
        if message.id in refused:
            reason = "recipient opted out after the message was accepted"
            unsent.append((message, MessageStatus.CANCELED, reason, "recipient_opted_out"))
    if unsent:  # rare: through the ORM, for the events these write
        session = await tx.session()
        for message, status, reason, code in unsent:
            outcomes[message.id] = await finish_unsent(
                session, message, status, reason, error_code=code
            )
    for message in claimed:
        del outcomes[message.id]
    return Claim(claimed, outcomes, senders)


def _expired(message: Message, now: datetime) -> bool:
    return message.expires_at is not None and now >= message.expires_at


def _not_due_for(message: Message, now: datetime) -> float | None:
    """Seconds until a message picked up early (a duplicate job, a restarted worker) is due;
    None when it is due (its backoff is kept otherwise)."""
    wait = (message.next_attempt_at - now).total_seconds()
    return wait if wait > NOT_DUE_TOLERANCE_SECONDS else None


async def claim_messages(
    session_factory: SessionFactory, message_ids: Collection[uuid.UUID]
) -> tuple[Claim, tuple[EventJob, ...]]:
    """The claim of a job (`claim`'s rules) in one statement and one round trip in the common
    case (`_CLAIM_NOW`); the messages it leaves over, expired or opted out, go through `claim`
    in a transaction of their own, which ends them with their events. If that transaction
    fails (or the job is cancelled while it runs), the messages already claimed are put back
    before the error goes on: nobody would send them. Runs again after a deadlock, as every
    state change does."""
    ids = list(message_ids)
    passes = sorted(PASSES_OPT_OUT)

    async def once() -> list[Any]:
        return await raw_statement(
            session_factory,
            _CLAIM_NOW,
            ids,
            passes,
            NOT_DUE_TOLERANCE_SECONDS,
            setup=_CLAIM_FUNCTION,
        )

    first, left_over = _claimed_rows(ids, await _retrying(once, TRANSACTION_ATTEMPTS))
    if not left_over:
        return first, ()
    claimed, outcomes, senders = first.claimed, dict(first.outcomes), first.senders

    async def work(tx: Tx) -> Claim:
        return await claim(tx, left_over)

    try:
        rest, events = await run_raw_transaction(session_factory, work)
    except BaseException:
        if claimed:
            await asyncio.shield(_put_back(session_factory, claimed))
        raise
    outcomes |= rest.outcomes
    for message in rest.claimed:  # opted back in meanwhile
        outcomes.pop(message.id, None)
    return Claim(claimed + rest.claimed, outcomes, senders | rest.senders), events


def _claimed_rows(ids: list[uuid.UUID], rows: list[Any]) -> tuple[Claim, list[uuid.UUID]]:
    """What `_CLAIM_NOW` did, as a `Claim`, and the ids left for `claim` to end (expired, or
    refused for an opt-out), judged in `claim`'s order: expired, not due, refused."""
    outcomes: dict[uuid.UUID, Outcome] = dict.fromkeys(ids, Outcome(None))
    claimed: list[Message] = []
    senders: dict[uuid.UUID, SenderTerms] = {}
    left_over: list[uuid.UUID] = []
    terms = len(_COLUMNS)
    for row in rows:
        message = _message(row)
        senders[message.sender_id] = SenderTerms(row[terms], row[terms + 1])
        now, attempts, claimed_at, refused = row[terms + 2 : terms + 6]
        if claimed_at is not None:
            message.status = MessageStatus.SENDING.value
            message.attempts, message.claimed_at = attempts, claimed_at
            claimed.append(message)
            del outcomes[message.id]
        elif message.status != MessageStatus.QUEUED.value:
            continue  # moved on: nothing to do
        elif _expired(message, now):
            left_over.append(message.id)
        elif (wait := _not_due_for(message, now)) is not None:
            outcomes[message.id] = Outcome(MessageStatus.QUEUED, retry_in=wait)
        elif refused:
            left_over.append(message.id)
        # else claimed by another job meanwhile: nothing to do
    return Claim(claimed, outcomes, senders), left_over


async def _put_back(session_factory: SessionFactory, messages: Sequence[Message]) -> None:
    """Undo these claims (their provider calls never started), in one transaction, rows in id
    order. If that fails too (the database is gone), reconciliation finds the claims; the
    caller's error goes on, not this one."""

    async def work(session: AsyncSession) -> None:
        for message in sorted(messages, key=lambda m: m.id):
            reason = "the job stopped before the provider call"
            await release(session, message, reason, message.provider)

    try:
        await run_transaction(session_factory, work)
    except Exception:
        log.exception(
            "claims not put back; reconciliation will find them",
            extra={"messages": [str(m.id) for m in messages]},
        )


# The claim of every delivery, after the recipients' locks (so its snapshot sees every opt-out
# recorded before them): the messages whose recipient opted out of their sender are refused
# (the rule of `optouts.OPTED_OUT_SQL`; opt-out confirmations and HELP replies pass), the others
# still queued, due and unexpired move to `sending` with the database's time, each with its
# history row. Returns the claimed (id, attempts, claimed_at) and the refused ids.
_CLAIM: Final = f"""
WITH wanted AS (
    SELECT m.id, m.kind, m."to", m.sender_id FROM messages AS m
    WHERE m.id = ANY($1::uuid[])
), refused AS (
    SELECT id FROM wanted
    WHERE kind <> ALL($2::varchar[])
        AND {OPTED_OUT_SQL.format(phone='wanted."to"', sender_id="wanted.sender_id")}
), claimed AS (
    UPDATE messages AS m
    SET status = 'sending', attempts = m.attempts + 1, claimed_at = now(), updated_at = now()
    FROM wanted
    WHERE m.id = wanted.id AND wanted.id NOT IN (SELECT id FROM refused)
        AND m.status = 'queued'
        AND m.next_attempt_at <= now() + make_interval(secs => $3::float8)
        AND (m.expires_at IS NULL OR m.expires_at > now())
    RETURNING m.id, m.attempts, m.claimed_at
), history AS (
    INSERT INTO message_events (message_id, status, applied, source, detail)
    SELECT id, 'sending', true, 'worker', 'attempt ' || attempts FROM claimed
)
SELECT id, attempts, claimed_at, false AS refused FROM claimed
UNION ALL
SELECT id, NULL, NULL, true FROM refused
"""

# The common claim in one statement: a function of the connection's own (in `pg_temp`, made on
# the connection's first claim: no schema object to migrate), whose two statements are the
# claim's two steps, the recipients' locks and then `_CLAIM`: each statement of a VOLATILE
# PL/pgSQL function takes a snapshot of its own, so the claim's follows the locks as in
# `claim`'s transaction, and sees a STOP recorded by whoever held one. It is given the messages
# that were queued when the statement began (as `claim` claims only those its read found
# queued, whose recipients it locked) and locks all their recipients. `$1`..`$3` are the
# function's arguments, as they are `_CLAIM`'s. The locks are held until the statement ends.
# Its name carries a digest of its text, so a connection that outlives a deploy (a pooler's)
# never runs an older version.
_GIVEN_RECIPIENTS: Final = """SELECT "to" AS phone FROM messages WHERE id = ANY($1)"""
_CLAIM_FUNCTION_BODY: Final = f"""
RETURNS TABLE (c_id uuid, c_attempts smallint, c_claimed_at timestamptz, c_refused boolean)
LANGUAGE plpgsql VOLATILE AS $claim$
BEGIN
    PERFORM locked FROM {RECIPIENT_LOCKS_SQL.format(phones=_GIVEN_RECIPIENTS)} AS held;
    RETURN QUERY {_CLAIM};
END
$claim$
"""
_CLAIM_FUNCTION_TEXT: Final = (
    "CREATE OR REPLACE FUNCTION {name}(uuid[], varchar[], float8)" + _CLAIM_FUNCTION_BODY
)
_CLAIM_FUNCTION_NAME: Final = (
    "pg_temp.smsgate_claim_" + hashlib.sha256(_CLAIM_FUNCTION_TEXT.encode()).hexdigest()[:12]
)
_CLAIM_FUNCTION: Final = _CLAIM_FUNCTION_TEXT.replace("{name}", _CLAIM_FUNCTION_NAME, 1)
# The claim's statement: the messages as `claim`'s read gives them (read before the locks, as
# there), their senders' terms and the database's now, then what the function did to each of
# those queued: the new attempt and claim time when claimed, whether refused for an opt-out.
_CLAIM_NOW: Final = f"""
WITH found AS MATERIALIZED (
    SELECT {", ".join(f'm."{name}"' for _, name in _COLUMNS)},
        s.rate_per_second, s.fallback_provider
    FROM messages AS m JOIN senders AS s ON s.id = m.sender_id
    WHERE m.id = ANY($1::uuid[])
), claim AS MATERIALIZED (
    SELECT * FROM {_CLAIM_FUNCTION_NAME}(
        ARRAY(SELECT id FROM found WHERE status = 'queued'), $2::varchar[], $3::float8
    )
)
SELECT found.*, now(), claim.c_attempts, claim.c_claimed_at, claim.c_refused
FROM found LEFT JOIN claim ON claim.c_id = found.id
"""


async def _claim_rows(
    tx: Tx, candidates: Sequence[Message]
) -> tuple[list[Message], set[uuid.UUID]]:
    """Run `_CLAIM` for these (locked, due, unexpired) messages: the claimed ones, brought up
    to date without a second read, and the ids refused for an opt-out."""
    if not candidates:
        return [], set()
    rows = await tx.fetch(
        _CLAIM, [m.id for m in candidates], sorted(PASSES_OPT_OUT), NOT_DUE_TOLERANCE_SECONDS
    )
    by_id = {m.id: m for m in candidates}
    claimed, refused = [], set()
    for message_id, attempts, claimed_at, was_refused in rows:
        if was_refused:
            refused.add(message_id)
            continue
        message = by_id[message_id]
        message.status = MessageStatus.SENDING.value
        message.attempts = attempts
        message.claimed_at = claimed_at
        claimed.append(message)
    return claimed, refused


async def finish_unsent(
    session: AsyncSession,
    message: Message,
    status: MessageStatus,
    reason: str,
    *,
    error_code: str | None = None,
    source: str = "worker",
    waiting: Collection[MessageStatus] = (MessageStatus.QUEUED,),
) -> Outcome:
    """End a message still `waiting` (queued; or scheduled) without sending it (expired,
    canceled); a no-op if it moved."""
    done = await session.scalar(
        update(Message)
        .where(Message.id == message.id, Message.status.in_([w.value for w in waiting]))
        .values(status=status.value, error_code=error_code or status.value, error_message=reason)
        .returning(Message.id)
    )
    if done is None:
        return Outcome(None)
    count_status(status.value, message.provider, message.from_)
    session.add(
        _history(
            message.id, status, applied=True, detail=reason, error_code=error_code, source=source
        )
    )
    await emit_message_status(session, message.id)
    return Outcome(status)


# What a cancel may still stop: a message no delivery attempt holds (a `held` one: nothing
# sends it until an admin releases it, and the release is conditional on it still being held).
CANCELABLE: Final = (MessageStatus.SCHEDULED, MessageStatus.QUEUED, MessageStatus.HELD)


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What a cancel found: whether this call canceled the message, and its status now
    (`canceled`, also when it was already; else the status that kept it from being canceled)."""

    canceled: bool
    status: MessageStatus


async def cancel_message(
    session: AsyncSession, message_id: uuid.UUID, client_id: uuid.UUID | None
) -> Cancellation:
    """Cancel a message that is `scheduled`, `held` or still `queued`, in the session's
    transaction: the recipient's lock, then the conditional UPDATE of `finish_unsent`, as a
    claim takes them, so a cancel and a claim of the same message are decided one after the
    other: exactly one wins. `client_id` None: any client's message (an admin); `NotFound` for
    a message that is not the client's."""
    query = select(Message).where(Message.id == message_id)
    if client_id is not None:
        query = query.where(Message.client_id == client_id)
    message = await session.scalar(query)
    if message is None:
        raise NotFound("message_not_found", f"no message with id {message_id}")
    if message.status in CANCELABLE:
        await lock_recipients(session, [message.to])
        outcome = await finish_unsent(
            session,
            message,
            MessageStatus.CANCELED,
            "canceled by its client",
            error_code="canceled",
            source="api",
            waiting=CANCELABLE,
        )
        if outcome.status is MessageStatus.CANCELED:
            return Cancellation(True, MessageStatus.CANCELED)
    # It moved (or had moved) on: its status now, read under the recipient's lock if taken.
    await session.refresh(message, ["status"])
    return Cancellation(False, MessageStatus(message.status))


async def cancel_queued(session: AsyncSession, client_id: uuid.UUID, message_id: uuid.UUID) -> bool:
    """`cancel_message` for the Twilio-compatible API: whether this call canceled it."""
    return (await cancel_message(session, message_id, client_id)).canceled


# Scheduled messages whose time has come move to `queued`, due now (the database's clock), a
# bounded chunk at a time, each with its history row. Rows another scheduler (or a cancel) holds
# are skipped, not waited for; the UPDATE's own condition makes a second promotion impossible.
_PROMOTE_SCHEDULED: Final = """
WITH due AS (
    SELECT id FROM messages
    WHERE status = 'scheduled' AND send_at <= now()
    ORDER BY send_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE messages AS m
    SET status = 'queued', next_attempt_at = now(), updated_at = now()
    FROM due
    WHERE m.id = due.id AND m.status = 'scheduled' AND m.send_at <= now()
    RETURNING m.id
), history AS (
    INSERT INTO message_events (message_id, status, applied, source, detail)
    SELECT id, 'queued', true, 'scheduler', 'its send time came' FROM moved
)
SELECT id FROM moved
"""


async def promote_scheduled(session_factory: SessionFactory, limit: int) -> list[uuid.UUID]:
    """Move up to `limit` due `scheduled` messages to `queued`, in one committed statement;
    their ids (to hand to the delivery feed: the claim then checks opt-outs and expiry)."""
    rows = await _retrying(
        lambda: raw_statement(session_factory, _PROMOTE_SCHEDULED, limit), TRANSACTION_ATTEMPTS
    )
    return [row["id"] for row in rows]


# Held messages settled per transaction by a bulk release or cancel (a client's burst may hold
# thousands: each chunk is its own short transaction).
HELD_CHUNK: Final = 500


def _held(
    message_id: uuid.UUID | None,
    client_id: uuid.UUID | None,
    before: datetime | None,
    limit: int,
) -> Select[uuid.UUID]:
    """The held messages `settle_held` moves, locked (those another admin is settling: skipped).
    A client's (or, with neither id, every client's) are read oldest first through
    `ix_messages_held`."""
    target = select(Message.id).where(Message.status == MessageStatus.HELD.value)
    if message_id is not None:
        target = target.where(Message.id == message_id)
    else:
        if client_id is not None:
            target = target.where(Message.client_id == client_id)
        target = target.order_by(Message.created_at)
    if before is not None:
        target = target.where(Message.created_at < before)
    return target.limit(limit).with_for_update(skip_locked=True)


# A released message goes back where it was before the alarm held it: `scheduled` while its
# `send_at` (a client's time, or the end of quiet hours) is still ahead, else `queued`, due
# then. The scheduler promotes it by `send_at`, as any scheduled message.
_RELEASED_STATUS: Final = case(
    (Message.send_at > func.now(), MessageStatus.SCHEDULED.value),
    else_=MessageStatus.QUEUED.value,
)
_RELEASE: Final = {
    "status": _RELEASED_STATUS,
    "next_attempt_at": func.greatest(Message.send_at, func.now()),
}


def _held_changes(release: bool, reason: str | None) -> tuple[dict[str, Any], str]:
    """The UPDATE's values for a release or a cancel, and its history row's detail."""
    if release:
        return dict(_RELEASE), "released by an admin"
    changes = {
        "status": MessageStatus.CANCELED.value,
        "error_code": "canceled",
        "error_message": reason or "canceled by an admin (held)",
    }
    return changes, reason or "canceled by an admin (held as suspected SMS pumping)"


async def settle_held(
    session: AsyncSession,
    *,
    release: bool,
    message_id: uuid.UUID | None = None,
    client_id: uuid.UUID | None = None,
    before: datetime | None = None,
    limit: int = HELD_CHUNK,
    reason: str | None = None,
    source: str = "admin",
) -> list[uuid.UUID]:
    """An admin's decision on messages the pumping alarm held: release them (held -> queued,
    due now, enqueued after the commit; or held -> scheduled while their `send_at` is ahead)
    or cancel them (held -> canceled, with their `message.canceled` events). One message by
    id, or up to `limit` of a client's (of every client's with neither id: the retention
    job), oldest first (created before `before`, so a bulk run does not chase a burst still
    arriving). Conditional: a message no longer held is left alone, and one another admin is
    settling meanwhile is skipped (SKIP LOCKED). Only the message rows are locked (a held
    message has no claim to race, and the claim re-checks opt-outs). The ids moved."""
    target = _held(message_id, client_id, before, limit)
    changes, detail = _held_changes(release, reason)
    moved = (
        await session.execute(
            update(Message)
            .where(
                Message.id.in_(target.scalar_subquery()),
                Message.status == MessageStatus.HELD.value,
            )
            .values(**changes)
            .returning(
                Message.id, Message.client_id, Message.provider, Message.from_, Message.status
            )
            .execution_options(synchronize_session=False)
        )
    ).all()
    for row in moved:
        status = MessageStatus(row.status)
        count_status(status.value, row.provider, row.from_)
        session.add(_history(row.id, status, applied=True, detail=detail, source=source))
    if release:
        queued = [row.id for row in moved if row.status == MessageStatus.QUEUED.value]
        session.info.setdefault(ENQUEUE_AFTER_COMMIT, []).extend(queued)
    else:
        await session.flush()
        await emit_message_statuses(
            session, [Message(id=row.id, client_id=row.client_id) for row in moved]
        )
    return [row.id for row in moved]


def _pending(message: Message) -> ColumnElement[bool]:
    """The condition every change of a claimed message is conditional on: it is still this
    attempt's (no report, reconciliation or later attempt moved it meanwhile)."""
    return and_(
        Message.id == message.id,
        Message.status == MessageStatus.SENDING.value,
        Message.attempts == message.attempts,
        # A claim put back and claimed again has the same attempt number (waiting is not an
        # attempt) but a new claim time: what was decided about the old claim misses it.
        Message.claimed_at.is_not_distinct_from(message.claimed_at),
    )


async def release(
    session: AsyncSession,
    message: Message,
    reason: str,
    home: str,
    *,
    quiet: bool = False,
    retry_in: float | None = None,
) -> bool:
    """Undo a claim before the provider was called: back to `queued` on its own provider
    (`home`), the attempt not counted, due again in `retry_in` seconds (database clock) when
    its turn is known, so the lost-message sweep does not pick it up meanwhile. Whether it was
    still this attempt's to undo.

    `quiet` for a message the delivery gate turned back (an open circuit, a paused provider, a
    sender's line): its history reads as if it was never claimed (the claim's `sending` row is
    removed, and the reason is a note counting a run of waits), as waiting is never an attempt."""
    changes: dict[str, Any] = {
        "status": MessageStatus.QUEUED.value,
        "attempts": Message.attempts - 1,
        "provider": home,
    }
    if retry_in is not None:
        changes["next_attempt_at"] = func.now() + timedelta(seconds=retry_in)
    released = await session.scalar(
        update(Message).where(_pending(message)).values(**changes).returning(Message.id)
    )
    if released is None:
        return False
    if not quiet:
        session.add(
            _history(message.id, MessageStatus.QUEUED, applied=True, detail=f"not sent: {reason}")
        )
        return True
    claim_row = (
        select(func.max(MessageEvent.id))
        .where(MessageEvent.message_id == message.id, MessageEvent.status == "sending")
        .scalar_subquery()
    )
    await session.execute(delete(MessageEvent).where(MessageEvent.id == claim_row))
    # One note per run of waits for the same reason, counting them (a message behind a slow
    # sender may wait hundreds of times).
    await note_repeatable(session, message.id, f"not sent: {reason}", key=reason.split(";")[0])
    return True


async def reroute(session: AsyncSession, message: Message, provider: str, reason: str) -> bool:
    """Send a claimed message through another provider (failover), before it is called: its
    callbacks and any reconciliation go there too. Whether it was still this attempt's."""
    moved = await session.scalar(
        update(Message).where(_pending(message)).values(provider=provider).returning(Message.id)
    )
    if moved is not None:
        log.warning(
            "message failed over",
            extra={"message_id": str(message.id), "from": message.provider, "to": provider},
        )
        # A note beside the attempt's `sending` row (the status does not change).
        detail = f"attempt {message.attempts} via {provider}: {reason} (failover)"
        session.add(_note(message.id, detail))
    return moved is not None


async def requeue(
    session: AsyncSession, message: Message, retry_in: float, code: str | None, detail: str
) -> bool:
    """A retryable failure: back to `queued`, due in `retry_in` seconds (database clock)."""
    requeued = await session.scalar(
        update(Message)
        .where(_pending(message))
        .values(
            status=MessageStatus.QUEUED.value,
            next_attempt_at=func.now() + timedelta(seconds=retry_in),
            error_code=code,
            error_message=detail,
        )
        .returning(Message.id)
    )
    session.add(
        _history(
            message.id,
            MessageStatus.QUEUED,
            applied=requeued is not None,
            detail=f"retry in {retry_in:.1f}s after: {detail}",
            error_code=code,
        )
    )
    return requeued is not None


async def fail(
    session: AsyncSession,
    message: Message,
    *,
    error_code: str,
    detail: str,
    source: str = "worker",
    event_code: str | None = None,
    note_if_moved_on: bool = True,
) -> bool:
    """End a claimed message as `failed`. Whether it moved; when it had moved on already, the
    attempt is still noted in its history unless `note_if_moved_on` is false."""
    failed = await session.scalar(
        update(Message)
        .where(_pending(message))
        .values(status=MessageStatus.FAILED.value, error_code=error_code, error_message=detail)
        .returning(Message.id)
    )
    if failed is None and not note_if_moved_on:
        return False
    session.add(
        _history(
            message.id,
            MessageStatus.FAILED,
            applied=failed is not None,
            detail=detail,
            error_code=event_code,
            source=source,
        )
    )
    if failed is not None:
        count_status(MessageStatus.FAILED.value, message.provider, message.from_)
        await emit_message_status(session, message.id)
    return failed is not None


def note_unknown_outcome(
    session: AsyncSession, message: Message, code: str | None, detail: str
) -> None:
    """The provider may have the message: it stays `sending` (never resent blindly) until a
    status report or reconciliation settles it; only its history says so."""
    session.add(_note(message.id, f"outcome unknown: {detail}", error_code=code))


# A note that repeats the message's latest one (same `key`) updates it and counts it instead of
# adding a row: `payload.times`, `payload.last_at`, and the newest detail.
_REPEATABLE_NOTE: Final = text(
    """
WITH latest AS (
    SELECT id FROM message_events WHERE message_id = :message_id ORDER BY id DESC LIMIT 1
), bumped AS (
    UPDATE message_events AS e
    SET detail = :detail || ' (' || ((e.payload->>'times')::int + 1) || ' times since '
            || to_char(e.created_at AT TIME ZONE 'UTC', 'HH24:MI:SS') || ' UTC)',
        payload = e.payload || jsonb_build_object(
            'times', (e.payload->>'times')::int + 1, 'last_at', now())
    FROM latest
    WHERE e.id = latest.id AND e.status IS NULL AND e.payload->>'repeat' = :key
    RETURNING e.id
)
INSERT INTO message_events (message_id, status, applied, source, detail, payload)
SELECT :message_id, NULL, false, :source, :detail,
    jsonb_build_object('repeat', CAST(:key AS text), 'times', 1, 'last_at', now())
WHERE NOT EXISTS (SELECT 1 FROM bumped)
"""
)


async def note_repeatable(
    session: AsyncSession, message_id: uuid.UUID, detail: str, *, key: str, source: str = "worker"
) -> None:
    """A note (no status change) that summarises repeats: when the message's latest history row
    is a note with the same `key`, that row is updated and counted rather than a row added."""
    await session.execute(
        _REPEATABLE_NOTE,
        {"message_id": message_id, "detail": detail, "key": key, "source": source},
    )


def _note(message_id: uuid.UUID, detail: str, *, error_code: str | None = None) -> MessageEvent:
    """A history row that changes no status (it is not shown as a transition)."""
    return MessageEvent(
        message_id=message_id,
        status=None,
        applied=False,
        source="worker",
        error_code=error_code,
        detail=detail,
    )


@dataclass(frozen=True, slots=True)
class Acceptance:
    """A claimed message its provider accepted, as `provider_message_id`."""

    message: Message
    provider: str
    provider_message_id: str
    part_ids: tuple[str, ...] = ()  # each part's id, when its provider reports per part


# Record acceptances in one statement: each message still at this attempt moves to `sent` with
# its provider id, and without the error of an earlier attempt (it stays in the history); one a
# report or a later attempt moved on keeps its status and gets the id only if it has none (a
# report may have set it first); every acceptance gets its history row. Returns the moved ids,
# each with whether its client is to be told (`events.MAY_NOTIFY_SQL`).
# With $6 ("quiet only"), the acceptances whose client is to be told are left alone and returned
# as `deferred`: the statement then writes no event and can commit on its own.
_MARK_SENT: Final = f"""
WITH accepted AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::smallint[], $3::timestamptz[], $4::varchar[], $5::text[]
    ) AS a(id, attempts, claimed_at, pid, detail)
), deferred AS (
    SELECT a.id FROM accepted AS a JOIN messages AS m ON m.id = a.id
    WHERE $6::boolean AND {MAY_NOTIFY_SQL.format(m="m")}
), recorded AS (
    SELECT * FROM accepted WHERE id NOT IN (SELECT id FROM deferred)
), moved AS (
    UPDATE messages AS m
    SET status = 'sent', provider_message_id = a.pid, error_code = NULL, error_message = NULL,
        updated_at = now()
    FROM recorded AS a
    WHERE m.id = a.id AND m.status = 'sending' AND m.attempts = a.attempts
      AND m.claimed_at IS NOT DISTINCT FROM a.claimed_at
    RETURNING m.id, {MAY_NOTIFY_SQL.format(m="m")} AS notify
), late AS (
    UPDATE messages AS m SET provider_message_id = a.pid, updated_at = now()
    FROM recorded AS a
    WHERE m.id = a.id AND m.provider_message_id IS NULL
      AND NOT (
          m.status = 'sending' AND m.attempts = a.attempts
          AND m.claimed_at IS NOT DISTINCT FROM a.claimed_at
      )
), history AS (
    INSERT INTO message_events (message_id, status, applied, source, detail)
    SELECT a.id, 'sent', a.id IN (SELECT id FROM moved), 'worker', a.detail FROM recorded AS a
)
SELECT id, notify, false AS deferred FROM moved
UNION ALL
SELECT id, NULL, true FROM deferred
"""


def _mark_sent_arguments(accepted: Sequence[Acceptance], *, quiet_only: bool) -> list[Any]:
    return [
        [a.message.id for a in accepted],
        [a.message.attempts for a in accepted],
        [a.message.claimed_at for a in accepted],
        [a.provider_message_id for a in accepted],
        [f"accepted by {a.provider} as {a.provider_message_id}" for a in accepted],
        quiet_only,
    ]


async def record_acceptances(
    session_factory: SessionFactory, accepted: Sequence[Acceptance]
) -> tuple[set[uuid.UUID], tuple[EventJob, ...]]:
    """Record that the provider accepted these messages: the ids that moved to `sent`, and the
    event deliveries written. Those whose client has no endpoint to tell (most, for a busy
    sender) in one statement that commits on its own; the others in a transaction with their
    events (`mark_sent`)."""
    if not accepted:
        return set(), ()
    # A long message reported part by part records its parts with its acceptance (`record_parts`).
    split = [a for a in accepted if a.part_ids]
    quiet = [a for a in accepted if not a.part_ids]

    async def quietly() -> list[Any]:
        arguments = _mark_sent_arguments(quiet, quiet_only=True)
        return await raw_statement(session_factory, _MARK_SENT, *arguments)

    rows = await _retrying(quietly, TRANSACTION_ATTEMPTS) if quiet else []
    moved = {message_id for message_id, _, deferred in rows if not deferred}
    _count_sent([a for a in accepted if a.message.id in moved])
    deferred = {message_id for message_id, _, was_deferred in rows if was_deferred}
    if not deferred and not split:
        return moved, ()

    async def with_events(tx: Tx) -> set[uuid.UUID]:
        told = await mark_sent(tx, [a for a in quiet if a.message.id in deferred] + split)
        await record_parts(tx, split)
        return told

    told, events = await run_raw_transaction(session_factory, with_events)
    return moved | told, events


async def mark_sent(tx: Tx, accepted: Sequence[Acceptance]) -> set[uuid.UUID]:
    """Record that the provider accepted these messages, with the events of the clients that
    have an endpoint, in the caller's transaction: the ids that moved to `sent`. A fast delivery
    report may already have moved a message past `sent` (or a later attempt may own it): then
    only the provider's id is recorded, where it has none."""
    if not accepted:
        return set()
    rows = await tx.fetch(_MARK_SENT, *_mark_sent_arguments(accepted, quiet_only=False))
    moved = {message_id for message_id, _, _ in rows}
    notify = [message_id for message_id, told, _ in rows if told]
    if notify:
        session = await tx.session()
        for message_id in notify:
            await emit_message_status(session, message_id)
    _count_sent([a for a in accepted if a.message.id in moved])
    return moved


def _count_sent(accepted: Sequence[Acceptance]) -> None:
    for a in accepted:
        count_status(MessageStatus.SENT.value, a.message.provider, a.message.from_)


async def resubmit(session: AsyncSession, message: Message, detail: str) -> int | None:
    """Reconciliation found no trace of an unknown outcome at the provider: queue the message
    again, due now. Its new resubmission count, or None if it had moved on."""
    requeued: int | None = await session.scalar(
        update(Message)
        .where(_pending(message))
        .values(
            status=MessageStatus.QUEUED.value,
            next_attempt_at=func.now(),
            resubmissions=Message.resubmissions + 1,
        )
        .returning(Message.resubmissions)
    )
    if requeued is not None:
        session.add(
            _history(
                message.id,
                MessageStatus.QUEUED,
                applied=True,
                detail=detail,
                error_code="outcome_unknown",
                source="reconcile",
            )
        )
    return requeued


async def lock_pending(session: AsyncSession, message: Message) -> bool:
    """Lock the claimed message's row while it is still this attempt's (reconciliation settles
    it under this lock); whether it was."""
    return (
        await session.scalar(select(Message.id).where(_pending(message)).with_for_update())
    ) is not None


def _history(
    message_id: uuid.UUID,
    status: MessageStatus,
    *,
    applied: bool,
    detail: str,
    error_code: str | None = None,
    source: str = "worker",
) -> MessageEvent:
    return MessageEvent(
        message_id=message_id,
        status=status.value,
        applied=applied,
        source=source,
        error_code=error_code,
        detail=detail,
    )


# A provider's report, applied in one statement: find the message (by our id, else by the
# provider's id, else, for a report on one part, by that part's id); take the recipient's lock
# when the report says they opted out, then the message row's (the one lock order, as a claim);
# move it to the report's status when that is forward (`statuses_before`, decided on the locked
# row, so concurrent reports are decided one after the other); record the provider's id where
# the message has none (a report may beat the worker's record); and write the history row with
# the report (`applied` false for a late, repeated or backward one). A report on one part of a
# split message ($4 and `split`) is only found and locked: its parts decide (`apply_part_report`)
# and the statement runs again with their settlement ($15). Returns the message, whether it
# moved, and whether its client is to be told (`events.MAY_NOTIFY_SQL`).
_FOUND_REPORTED: Final = """SELECT m.id, m."to" FROM messages AS m WHERE m.id = COALESCE(
        (SELECT id FROM messages WHERE id = $2 AND provider = $1),
        (SELECT id FROM messages WHERE provider = $1 AND provider_message_id = $3 LIMIT 1),
        (SELECT part.message_id FROM message_parts AS part
            JOIN messages AS owner ON owner.id = part.message_id
            WHERE $4 AND owner.provider = $1 AND part.provider_message_id = $3 LIMIT 1)
    )"""
_OPTED_OUT_RECIPIENT: Final = """SELECT "to" AS phone FROM found WHERE $5"""
_APPLY_REPORT: Final = f"""
WITH found AS ({_FOUND_REPORTED}
), held AS MATERIALIZED {RECIPIENT_LOCKS_SQL.format(phones=_OPTED_OUT_RECIPIENT)},
locked AS (
    SELECT m.id, m."to", m.sender_id, m."from", m.status, m.provider_message_id,
        $4 AND (m.segments > 1 OR EXISTS (
            SELECT 1 FROM message_parts AS part WHERE part.message_id = m.id
        )) AS split,
        {MAY_NOTIFY_SQL.format(m="m")} AS notify
    FROM messages AS m, found, held
    WHERE m.id = found.id
    FOR UPDATE OF m
), decided AS (
    SELECT *, (NOT split OR $15) AS deciding,
        (NOT split OR $15) AND $6::varchar IS NOT NULL AND status = ANY($7::varchar[]) AS moves
    FROM locked
), moved AS (
    UPDATE messages AS m
    SET status = CASE WHEN d.moves THEN $6 ELSE m.status END,
        error_code = CASE WHEN d.moves THEN $8 ELSE m.error_code END,
        error_message = CASE WHEN d.moves THEN $9 ELSE m.error_message END,
        -- Whatever the service had given up on (status checks) is settled by this news.
        status_detail = CASE WHEN d.moves THEN NULL ELSE m.status_detail END,
        -- A part's id is not the message's: the acceptance records the first part's.
        provider_message_id = COALESCE(m.provider_message_id, CASE WHEN NOT d.split THEN $3 END),
        updated_at = now()
    FROM decided AS d
    WHERE m.id = d.id AND (d.moves OR (m.provider_message_id IS NULL AND NOT d.split))
), history AS (
    INSERT INTO message_events (
        message_id, status, applied, source, provider_status, error_code, detail, payload
    )
    SELECT id, CASE WHEN moves THEN $6 ELSE $10 END, moves, $1, $11, $12, $13, $14::text::jsonb
    FROM decided WHERE deciding
)
SELECT id, "to", sender_id, "from", split, moves, notify, $6 AS moved_to FROM decided
"""


async def apply_status_report(tx: Tx, provider: str, report: StatusReport) -> bool:
    """Record a provider's report and move the message forward if it is news, in the caller's
    transaction: one statement (`_APPLY_REPORT`), and the ORM only where the rare cases need it
    (one part of a split message, an opt-out the provider reported, an event to write).

    Returns False when no message matches (the caller still acknowledges it). Duplicated and
    late reports are stored as history rows with `applied` false and change nothing.
    """
    report = _storable_report(report)
    rows = await tx.fetch(_APPLY_REPORT, *_report_arguments(provider, report, None))
    if not rows:
        return False
    row = rows[0]
    message_id_var.set(str(row["id"]))  # the rest of this request's log lines are about it
    if row["split"]:
        # One part of a long message (its row locked above): the message settles from all its
        # parts, and the same statement applies what they say.
        session = await tx.session()
        settlement = await apply_part_report(session, Message(id=row["id"]), report)
        arguments = _report_arguments(provider, replace(report, message_id=row["id"]), settlement)
        row = (await tx.fetch(_APPLY_REPORT, *arguments))[0]
    if report.recipient_opted_out:
        # Under the recipient's lock, which the statement took before the row's.
        await record_provider_opt_out(
            await tx.session(),
            phone=row["to"],
            sender_id=row["sender_id"],
            provider=provider,
            code=report.error_code,
            detail=report.error_message,
        )
    if row["moves"]:
        count_status(row["moved_to"], provider, row["from"])
        if row["notify"]:
            await emit_message_status(await tx.session(), row["id"])  # events out (after commit)
    return True


def _report_arguments(
    provider: str, report: StatusReport, settlement: Settlement | None
) -> list[Any]:
    """`_APPLY_REPORT`'s parameters: a report on a whole message settles it by itself; one on a
    part of a split message, by the `settlement` its parts gave (None: not asked yet)."""
    settled = settlement is not None
    if settlement is None:
        settlement = Settlement(
            report.status, report.error_code, report.error_message, report.error_message
        )
    status = settlement.status
    return [
        provider,
        report.message_id,
        report.provider_message_id,
        report.per_part,
        report.recipient_opted_out and not settled,  # the lock is held already the second time
        status.value if status else None,
        [s.value for s in statuses_before(status)] if status else [],
        settlement.error_code,
        settlement.error_message,
        report.status.value if report.status else None,
        report.provider_status,
        report.error_code,
        settlement.detail,
        json.dumps(dict(report.raw)),
        settled,
    ]


async def record_status_report(
    session_factory: SessionFactory, provider: str, report: StatusReport
) -> tuple[bool, tuple[EventJob, ...]]:
    """`apply_status_report` in a transaction of its own, run again after a deadlock: a status
    callback answered 500 is not sent again by Twilio. Returns whether a message matched, and
    the event deliveries to enqueue."""

    async def work(tx: Tx) -> bool:
        return await apply_status_report(tx, provider, report)

    return await run_raw_transaction(session_factory, work)


async def _advance(
    session: AsyncSession, provider: str, message: Message, settlement: Settlement
) -> bool:
    """Move the message to the settlement's status if that is forward; whether it moved. Its
    error becomes the settlement's: an earlier attempt's error does not describe the new state
    (the history keeps it)."""
    status = settlement.status
    if status is None or not can_advance(MessageStatus(message.status), status):
        return False
    moved = await session.scalar(
        update(Message)
        .where(
            Message.id == message.id,
            Message.status.in_([s.value for s in statuses_before(status)]),
        )
        .values(
            status=status.value,
            error_code=settlement.error_code,
            error_message=settlement.error_message,
            # Whatever the service had given up on (status checks) is settled by this news.
            status_detail=None,
        )
        .returning(Message.id)
    )
    if moved is not None:
        count_status(status.value, provider, message.from_)
    return moved is not None


async def record_parts(tx: Tx, accepted: Sequence[Acceptance]) -> None:
    """After `mark_sent`: record the parts of the accepted messages their provider reports on
    part by part (`Accepted.part_ids`), and settle those whose receipts all came first (a cold
    path: the ORM session of the transaction, only for such messages)."""
    if not accepted:
        return
    session = await tx.session()
    settled = await record_accepted_parts(session, [(a.message.id, a.part_ids) for a in accepted])
    if not settled:
        return
    providers = {a.message.id: a.provider for a in accepted}
    # Read again under the lock `record_accepted_parts` took: the status a receipt left.
    messages = await session.scalars(
        select(Message).where(Message.id.in_(settled)).execution_options(populate_existing=True)
    )
    moved = []
    for message in messages:
        settlement = settled[message.id]
        if await _advance(session, providers[message.id], message, settlement):
            assert settlement.status is not None
            detail = settlement.detail or settlement.status.value
            session.add(_history(message.id, settlement.status, applied=True, detail=detail))
            moved.append(message)
    await emit_message_statuses(session, moved)


def _storable_report(report: StatusReport) -> StatusReport:
    """The report cut to our columns' sizes and without NUL: a report is recorded, never
    refused for its shape (the provider would retry it forever)."""
    return replace(
        report,
        provider_message_id=storable(report.provider_message_id)[:64],
        provider_status=storable(report.provider_status)[:32],
        error_code=storable(report.error_code)[:32] if report.error_code else None,
        error_message=storable(report.error_message) if report.error_message else None,
        raw=storable_mapping(report.raw),
    )
