"""Accepting messages: one road for a single send (a batch of one) and a batch.

Each message gets these checks, in this order, each refusal with its own error: its destination
(country and kind of number, `app.traffic.permissions`), its callback URL, the segment limit, its
sender, the sender's keyword replies, the client's quota (`app.traffic.quotas`, one Redis round
trip for the whole request, before any transaction), the recipient's opt-out. In a batch a
refused message does not refuse the others: its error takes its place in the results.

Callback URLs are resolved (DNS) before any database connection is taken; keys and senders come
from `app.access.lookups`. A message without `from` of a client without a default sender gets
its sender from the client's pool (`app.traffic.pools`): one more statement, only then. Without
an Idempotency-Key the accepted messages are stored by one autocommitted statement (opt-out
check, messages, first history rows); with one, by a short transaction of two statements (see
`_store_idempotently`). Delivery jobs are enqueued after the commit, so a job never points at
a row that was rolled back.

The SMS pumping alarm (app.traffic.velocity) counts the recipients: with its `hold` action in
Redis before the database statement, and the messages of a suspicious range are stored `held`
and not enqueued; with `alert` off the request, together with the other requests' numbers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Final, Literal

import asyncpg
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.auth import Principal, unknown_key
from app.access.lookups import Lookups, SenderInfo
from app.consent.optouts import OPTED_OUT_SQL
from app.db.models import Message
from app.db.pg import Database, fetch
from app.db.session import ENQUEUE_AFTER_COMMIT
from app.events.destinations import check_destination
from app.kernel.errors import PolicyRefusal, ServiceError, ValidationFailed
from app.kernel.metrics import count_status
from app.kernel.settings import Settings
from app.kernel.status import MessageStatus
from app.sending.encoding import BodyAnalysis, analyze_body
from app.sending.idempotency import StoredResponse, key_in_use, key_reused, lock_id
from app.traffic.control import TrafficControl
from app.traffic.pools import choose_senders, uses_pool
from app.traffic.rules import ClientRules
from app.traffic.velocity import PumpingAlarm, VelocityCheck

log = logging.getLogger(__name__)

# A key whose first holder committed between our read and our write is read again, this often.
IDEMPOTENCY_ATTEMPTS: Final = 3


@dataclass(frozen=True, slots=True)
class SendCommand:
    """A validated request to send one message (`to` is already E.164)."""

    to: str
    body: str
    sender: str | None = None
    callback_url: str | None = None
    validity_period: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Which API accepted it: "v1", or "twilio" (its callbacks then go out in Twilio's form).
    api: str = "v1"
    # When to send it (None: now), and whether it waits out the client's quiet hours.
    send_at: datetime | None = None
    respect_quiet_hours: bool = False


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A request's Idempotency-Key and the fingerprint of its body."""

    key: str
    fingerprint: bytes
    ttl: timedelta


@dataclass(frozen=True, slots=True)
class Acceptor:
    """What accepting needs from the app: the pool, the lookups, the settings, and how to
    enqueue delivery (the API's `DeliveryBatcher.enqueue`)."""

    db: Database
    lookups: Lookups
    settings: Settings
    enqueue: Callable[[list[uuid.UUID]], Awaitable[None]]
    # Destination permissions and quotas (app.traffic).
    traffic: TrafficControl
    # The SMS pumping alarm (app.traffic.velocity); None: not checked.
    velocity: VelocityCheck | None = None


Result = dict[str, Any] | ServiceError
"""One message's outcome: its fields as `MessageOut` reads them (accepted), or its refusal."""

Render = Callable[[list[Result]], tuple[int, dict[str, Any]]]
"""The response for the results (status, body); it raises to refuse the whole request."""


def check_body(body: str, max_segments: int) -> BodyAnalysis:
    """Measure a body and enforce the segment limit."""
    analysis = analyze_body(body)
    if analysis.segments > max_segments:
        raise ValidationFailed.for_field(
            "too_many_segments",
            "body",
            f"needs {analysis.segments} {analysis.encoding} segments; the limit is {max_segments}",
        )
    return analysis


async def accept_messages(
    acceptor: Acceptor,
    principal: Principal,
    items: Sequence[SendCommand | ServiceError],
    *,
    render: Render,
    idempotency: Idempotency | None,
    batch: bool,
) -> StoredResponse:
    """Judge and store `items` (already validated one by one; an error there is that item's
    result), then enqueue what was accepted. With an Idempotency-Key, at most once per key.

    A cached sender deleted meanwhile fails the INSERT (nothing is stored): the caches are
    dropped and the request judged again once; a cached client deleted meanwhile is a 401.
    """
    try:
        return await _accept(acceptor, principal, items, render, idempotency, batch=batch)
    except asyncpg.ForeignKeyViolationError as error:
        acceptor.lookups.forget_all()
        if "client" in (error.constraint_name or ""):
            raise unknown_key() from None
    return await _accept(acceptor, principal, items, render, idempotency, batch=batch)


async def _accept(
    acceptor: Acceptor,
    principal: Principal,
    items: Sequence[SendCommand | ServiceError],
    render: Render,
    idempotency: Idempotency | None,
    *,
    batch: bool,
) -> StoredResponse:
    traffic = acceptor.traffic
    rules = await traffic.client_rules(principal.client_id)
    judged = await _judge(acceptor, principal, items, rules)
    # The quota is counted before any transaction, and given back for what was not stored.
    judged, quota = await traffic.take(principal.client_id, rules, judged)
    rows = [item for item in judged if isinstance(item, dict)]
    alarm = await _watch_velocity(acceptor, principal, rows)
    stored: list[dict[str, Any]] = []
    try:
        response, stored = await _store(
            acceptor, principal, judged, rows, render, idempotency, batch=batch, alarm=alarm
        )
    finally:
        await traffic.give_back(quota, rows, {row["id"] for row in stored})
    if quota is None or response.replayed:
        return response
    return replace(response, headers=quota.headers())


async def _store(
    acceptor: Acceptor,
    principal: Principal,
    judged: list[dict[str, Any] | ServiceError],
    rows: list[dict[str, Any]],
    render: Render,
    idempotency: Idempotency | None,
    *,
    batch: bool,
    alarm: PumpingAlarm | None,
) -> tuple[StoredResponse, list[dict[str, Any]]]:
    """Store the accepted rows (and the key's response), enqueue them: the response and the
    rows stored (none for a replay)."""
    if idempotency is None:
        async with acceptor.db.connection() as connection:
            refused = await _insert(connection, rows, opt_out_check=True) if rows else set()
        results, accepted = _outcome(judged, rows, refused)
        await _after_commit(acceptor, results, accepted, batch=batch, alarm=alarm)
        status, body = render(results)
        return StoredResponse(status, body, replayed=False), accepted
    response, results, accepted = await _store_idempotently(
        acceptor, principal, idempotency, judged, rows, render
    )
    if not response.replayed:
        await _after_commit(acceptor, results, accepted, batch=batch, alarm=alarm)
    return response, accepted


async def _watch_velocity(
    acceptor: Acceptor, principal: Principal, rows: list[dict[str, Any]]
) -> PumpingAlarm | None:
    """The pumping alarm: with the `hold` action its one Redis round trip, before the database
    statement, and the rows of a suspicious range become `held` (stored, not enqueued); with
    `alert` the numbers are only noted here (counted off the request)."""
    velocity = acceptor.velocity
    if velocity is None or not rows:
        return None
    numbers = (row["to"] for row in rows)
    alarm = await velocity.judge(principal.client_id, numbers, principal.pumping)
    if alarm is not None and alarm.action == "hold":
        digits = velocity.settings.range_digits
        for row in rows:
            if alarm.suspicious(row["to"], digits) is not None:
                row["status"] = MessageStatus.HELD.value
    return alarm


async def _judge(
    acceptor: Acceptor,
    principal: Principal,
    items: Sequence[SendCommand | ServiceError],
    rules: ClientRules,
) -> list[dict[str, Any] | ServiceError]:
    """Every check but the quota and the opt-out: each item's message row, or its refusal."""
    settings = acceptor.settings
    checked = await _check_messages(acceptor, items, rules)
    senders: dict[str | None, SenderInfo | ServiceError] = {}
    # Messages without `from` of a client without a default sender, still accepted: the pool's
    # choices (kept in `sender_affinity`, so never made for a message refused before).
    pooled = await _pool_choices(acceptor, principal, items, checked)
    now = datetime.now(UTC)

    async def judge(command: SendCommand, analysis: BodyAnalysis) -> dict[str, Any] | ServiceError:
        if uses_pool(principal, command.sender):
            sender = pooled[command.to]
        else:
            if command.sender not in senders:
                senders[command.sender] = await _sender(
                    acceptor.lookups, principal, command, settings
                )
            sender = senders[command.sender]
        if isinstance(sender, ServiceError):
            return sender
        return sender.refusal() or message_row(
            send_at=send_time(principal, command, now),
            client_id=principal.client_id,
            sender_id=sender.id,
            from_=sender.address,
            provider=sender.provider,
            to=command.to,
            body=command.body,
            analysis=analysis,
            callback_url=command.callback_url,
            metadata=command.metadata,
            validity_period=command.validity_period,
            api=command.api,
            now=now,
        )

    results: list[dict[str, Any] | ServiceError] = []
    for item, check in zip(items, checked, strict=True):
        if isinstance(check, ServiceError):
            results.append(check)
        elif isinstance(item, SendCommand):
            results.append(await judge(item, check))
    return results


async def _check_messages(
    acceptor: Acceptor, items: Sequence[SendCommand | ServiceError], rules: ClientRules
) -> list[BodyAnalysis | ServiceError]:
    """The checks before the sender, each item's in order (its destination, its callback URL,
    its segment count): its body's analysis, or its refusal."""
    urls = {item.callback_url for item in items if isinstance(item, SendCommand)}
    refused_urls = await _refused_callbacks({url for url in urls if url}, acceptor.settings)
    # Answers kept for the request: messages repeat bodies far more than they differ.
    analyses: dict[str, BodyAnalysis | ServiceError] = {}

    def check(command: SendCommand) -> BodyAnalysis | ServiceError:
        refused_destination = acceptor.traffic.judge_destination(command.to, rules)
        if refused_destination is not None:
            return refused_destination
        if command.callback_url in refused_urls:
            return refused_urls[command.callback_url]
        if command.body not in analyses:
            analyses[command.body] = _measure(command.body, acceptor.settings.max_segments)
        return analyses[command.body]

    return [item if isinstance(item, ServiceError) else check(item) for item in items]


async def _pool_choices(
    acceptor: Acceptor,
    principal: Principal,
    items: Sequence[SendCommand | ServiceError],
    checked: Sequence[BodyAnalysis | ServiceError],
) -> dict[str, SenderInfo | ServiceError]:
    """The pool's sender for each recipient of a message it routes that passed the checks so
    far (`app.traffic.pools`): one statement, and only when the request has such a message."""
    recipients = [
        item.to
        for item, check in zip(items, checked, strict=True)
        if isinstance(item, SendCommand)
        and isinstance(check, BodyAnalysis)
        and uses_pool(principal, item.sender)
    ]
    if not recipients:
        return {}
    return await choose_senders(acceptor.db, acceptor.lookups, principal, recipients)


async def _refused_callbacks(urls: set[str], settings: Settings) -> dict[str, ServiceError]:
    """The callback URLs we will not call, each checked once (DNS lookups run concurrently, and
    before any database connection is taken: a slow resolver must not hold one)."""
    if not urls:
        return {}

    async def check(url: str) -> ServiceError | None:
        try:
            await check_destination(url, settings.events, field="callback_url")
        except ServiceError as error:
            return error
        return None

    checked = await asyncio.gather(*(check(url) for url in urls))
    return {url: error for url, error in zip(urls, checked, strict=True) if error is not None}


def send_time(principal: Principal, command: SendCommand, now: datetime) -> datetime | None:
    """When the message is to leave (None: at once): its `send_at`, moved to the end of the
    client's quiet hours when it respects them and the recipient's local time is inside."""
    quiet = principal.quiet_hours
    if not command.respect_quiet_hours or quiet is None:
        return command.send_at
    return quiet.release(command.to, command.send_at or now) or command.send_at


def _measure(body: str, max_segments: int) -> BodyAnalysis | ServiceError:
    try:
        return check_body(body, max_segments)
    except ServiceError as error:
        return error


async def _sender(
    lookups: Lookups, principal: Principal, command: SendCommand, settings: Settings
) -> SenderInfo | ServiceError:
    try:
        return await lookups.sender(command.sender, principal, settings.default_region)
    except ServiceError as error:
        return error


def _outcome(
    judged: list[dict[str, Any] | ServiceError], rows: list[dict[str, Any]], refused: set[int]
) -> tuple[list[Result], list[dict[str, Any]]]:
    """Each item's result in request order, and the rows stored; `refused` are the indexes in
    `rows` of messages whose recipient opted out."""
    refused_ids = {rows[index]["id"] for index in refused}
    results: list[Result] = []
    accepted: list[dict[str, Any]] = []
    for item in judged:
        if isinstance(item, ServiceError):
            results.append(item)
        elif item["id"] in refused_ids:
            results.append(
                PolicyRefusal(
                    "recipient_opted_out",
                    f"{item['to']} has opted out of messages from {item['from']}",
                )
            )
        else:
            results.append(message_fields(item))
            accepted.append(item)
    return results, accepted


# Idempotency, in one transaction: (1) take the key's advisory lock, read its stored response
# and judge the opt-outs; (2) store the messages and the response, the latter only if no live
# response is stored meanwhile. (1)'s snapshot predates its lock, so a first request that
# committed in between is invisible to it; (2)'s ON CONFLICT sees it, stores nothing, and the
# transaction is run again (it then replays).
_CLAIM_KEY_SQL: Final = f"""
SELECT held.locked, stored.request_hash, stored.response_status,
       stored.response_body::text AS response_body,
       ARRAY(
           SELECT wanted.ordinal
           FROM unnest($4::text[], $5::uuid[]) WITH ORDINALITY AS wanted(phone, sender_id, ordinal)
           WHERE {OPTED_OUT_SQL.format(phone="wanted.phone", sender_id="wanted.sender_id")}
       ) AS refused
FROM (SELECT pg_try_advisory_xact_lock($1) AS locked) AS held
LEFT JOIN idempotency_keys AS stored
    ON held.locked AND stored.client_id = $2 AND stored.key = $3
    AND stored.created_at >= now() - make_interval(hours => $6)
"""


class _KeyTaken(Exception):
    """The key's first request committed while this one ran: read the key again."""


async def _store_idempotently(
    acceptor: Acceptor,
    principal: Principal,
    idempotency: Idempotency,
    judged: list[dict[str, Any] | ServiceError],
    rows: list[dict[str, Any]],
    render: Render,
) -> tuple[StoredResponse, list[Result], list[dict[str, Any]]]:
    """The stored response of the key's first request, or this request's, stored with its
    messages in one transaction. Only accepted requests are stored (`render` raises otherwise)."""
    client_id, key = principal.client_id, idempotency.key
    ttl_hours = idempotency.ttl // timedelta(hours=1)
    for _ in range(IDEMPOTENCY_ATTEMPTS):
        try:
            async with acceptor.db.transaction() as connection:
                (claim,) = await fetch(
                    connection,
                    _CLAIM_KEY_SQL,
                    lock_id(client_id, key),
                    client_id,
                    key,
                    [row["to"] for row in rows],
                    [row["sender_id"] for row in rows],
                    ttl_hours,
                )
                if not claim["locked"]:
                    raise key_in_use()
                if claim["request_hash"] is not None:
                    if claim["request_hash"] != idempotency.fingerprint:
                        raise key_reused()
                    stored = json.loads(claim["response_body"])
                    return StoredResponse(claim["response_status"], stored, True), [], []
                refused = {ordinal - 1 for ordinal in claim["refused"]}
                results, accepted = _outcome(judged, rows, refused)
                status, body = render(results)
                key_row = (client_id, key, idempotency.fingerprint, status, body, ttl_hours)
                if not await _insert(connection, accepted, key_row=key_row):
                    raise _KeyTaken
                return StoredResponse(status, body, replayed=False), results, accepted
        except _KeyTaken:
            continue
    raise key_in_use()


async def _after_commit(
    acceptor: Acceptor,
    results: list[Result],
    accepted: list[dict[str, Any]],
    *,
    batch: bool,
    alarm: PumpingAlarm | None = None,
) -> None:
    """Enqueue, count and log what was stored (single sends log each message, batches once);
    report the pumping alarm, if any. Neither a `held` message nor a scheduled one is
    enqueued: an admin releases the first, the worker's scheduler promotes the second when due."""
    queued = [row["id"] for row in accepted if row["status"] == MessageStatus.QUEUED.value]
    if queued:
        await acceptor.enqueue(queued)
    for (status, provider, address), amount in Counter(
        (r["status"], r["provider"], r["from"]) for r in accepted
    ).items():
        count_status(status, provider, address, amount)
    if alarm is not None and acceptor.velocity is not None:
        held = [r["to"] for r in accepted if r["status"] == MessageStatus.HELD.value]
        await acceptor.velocity.report(alarm, held)
    if batch:
        refused = Counter(result.code for result in results if isinstance(result, ServiceError))
        log.info(
            "batch processed",
            extra={
                "accepted": len(accepted),
                "rejected": len(results) - len(accepted),
                "refused": dict(refused),
            },
        )
    else:
        for row in accepted:
            log.info("message accepted", extra={"message_id": str(row["id"]), "kind": row["kind"]})
    if acceptor.settings.log_message_bodies:  # opted into by the operator (LOG_MESSAGE_BODIES)
        for row in accepted:
            log.info("message body", extra={"message_id": str(row["id"]), "body": row["body"]})


# ---- The one place a message row is built and inserted -------------------------------------


def message_row(
    *,
    client_id: uuid.UUID | None,
    sender_id: uuid.UUID,
    from_: str,
    provider: str,
    to: str,
    body: str,
    analysis: BodyAnalysis,
    kind: str = "regular",
    callback_url: str | None = None,
    metadata: dict[str, str] | None = None,
    validity_period: int | None = None,
    api: str = "v1",
    now: datetime,
    send_at: datetime | None = None,
) -> dict[str, Any]:
    """A new `queued` message (`scheduled`, with a `send_at`), keyed by column name. Its keys
    are the INSERT's column list: a column added here is stored by every path (single sends,
    batches, keyword replies). Its validity period counts from when it is to leave."""
    leaves = send_at or now
    return {
        "id": uuid.uuid4(),
        "client_id": client_id,
        "sender_id": sender_id,
        "kind": kind,
        "to": to,
        "from": from_,
        "body": body,
        "encoding": analysis.encoding.value,
        "segments": analysis.segments,
        "status": (MessageStatus.SCHEDULED if send_at else MessageStatus.QUEUED).value,
        "provider": provider,
        "callback_url": callback_url,
        "metadata": metadata or {},
        "validity_period": validity_period,
        "expires_at": leaves + timedelta(seconds=validity_period) if validity_period else None,
        "send_at": send_at,
        "api": api,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": leaves,
    }


_TABLE = Message.__table__
# Column name -> the `Message` attribute it maps to ("from" -> "from_").
_ATTRIBUTES: Final = {
    column.name: Message.__mapper__.get_property_by_column(column).key for column in _TABLE.c
}


_COLUMN_ATTRIBUTES: Final = tuple(_ATTRIBUTES.items())


def message_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as `MessageOut` reads a `Message`: the columns it was not given are null."""
    value = row.get
    return {attribute: value(name) for name, attribute in _COLUMN_ATTRIBUTES}


Gate = Literal["opt_out", "idempotency", "none"]


@cache
def _insert_sql(columns: tuple[str, ...], gate: Gate) -> str:
    """INSERT … SELECT FROM unnest(one array per column) of the messages and their first history
    rows, in one statement whatever the number of rows (one fixed, prepared text per shape).

    `gate` decides which rows go in: "opt_out" leaves out those whose recipient opted out and
    returns their ordinals; "idempotency" stores the key's response ($n+2…) and the messages
    only if no live response exists, returning whether it stored; "none" stores every row.
    """
    dialect = PGDialect()  # type: ignore[no-untyped-call]
    types = [_TABLE.c[name].type for name in columns]
    arrays = ", ".join(
        f"${n}::{'text' if _is_json(kind) else kind.compile(dialect=dialect)}[]"
        for n, kind in enumerate(types, start=1)
    )
    names = ", ".join(f'"{name}"' for name in columns)
    values = ", ".join(
        f'given."{name}"::jsonb' if _is_json(kind) else f'given."{name}"'
        for name, kind in zip(columns, types, strict=True)
    )
    source, first_extra = len(columns) + 1, len(columns) + 2
    ctes, where, result = _gate(gate, first_extra)
    return f"""
WITH given AS (
    SELECT * FROM unnest({arrays}) WITH ORDINALITY AS given({names}, ordinal)
),{ctes}
inserted AS (
    INSERT INTO messages ({names}) SELECT {values} FROM given WHERE {where}
    RETURNING id, status, created_at
),
history AS (
    INSERT INTO message_events (message_id, status, applied, source, created_at)
    SELECT id, status, true, ${source}, created_at FROM inserted
)
{result}
"""


def _gate(gate: Gate, n: int) -> tuple[str, str, str]:
    """(extra CTEs, the rows' condition, the final SELECT) of `_insert_sql`'s `gate`."""
    if gate == "opt_out":
        opted_out = OPTED_OUT_SQL.format(phone='given."to"', sender_id="given.sender_id")
        return (
            f"\nrefused AS (SELECT ordinal FROM given WHERE {opted_out}),",
            "ordinal NOT IN (SELECT ordinal FROM refused)",
            "SELECT ordinal FROM refused",
        )
    if gate == "idempotency":
        return (
            f"""
stored AS (
    INSERT INTO idempotency_keys
        (client_id, key, request_hash, response_status, response_body)
    VALUES (${n}, ${n + 1}, ${n + 2}, ${n + 3}, ${n + 4}::jsonb)
    ON CONFLICT (client_id, key) DO UPDATE SET
        request_hash = excluded.request_hash, response_status = excluded.response_status,
        response_body = excluded.response_body, created_at = now()
    WHERE idempotency_keys.created_at < now() - make_interval(hours => ${n + 5})
    RETURNING 1
),""",
            "EXISTS (SELECT FROM stored)",
            "SELECT count(*) AS stored FROM stored",
        )
    return "", "true", "SELECT count(*) AS stored FROM inserted"


def _is_json(kind: Any) -> bool:
    return isinstance(kind, postgresql.JSONB)


def _arguments(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[list[Any]]:
    """One array per column (JSON values as their text)."""
    return [
        [json.dumps(row[name]) for row in rows] if is_json else [row[name] for row in rows]
        for name, is_json in zip(columns, _json_columns(columns), strict=True)
    ]


@cache
def _json_columns(columns: tuple[str, ...]) -> tuple[bool, ...]:
    return tuple(_is_json(_TABLE.c[name].type) for name in columns)


async def _insert(
    connection: Any,
    rows: list[dict[str, Any]],
    *,
    opt_out_check: bool = False,
    key_row: tuple[Any, ...] | None = None,
    source: str = "api",
) -> Any:
    """Run `_insert_sql` on an asyncpg connection: the opt-out refused rows' indexes (with
    `opt_out_check`), whether the key's response was stored (with `key_row`), else the count."""
    columns = tuple(rows[0]) if rows else tuple(_EMPTY_ROW_COLUMNS)
    gate: Gate = "opt_out" if opt_out_check else "idempotency" if key_row else "none"
    arguments: list[Any] = [*_arguments(rows, columns), source]
    if key_row is not None:
        client_id, key, fingerprint, status, body, ttl_hours = key_row
        arguments += [client_id, key, fingerprint, status, json.dumps(body), ttl_hours]
    records = await fetch(
        connection, _insert_sql(columns, gate), *arguments, autocommit=gate == "opt_out"
    )
    if gate == "opt_out":
        return {record["ordinal"] - 1 for record in records}
    return records[0]["stored"]


# The column list of a statement with no rows (an idempotent batch whose every message was
# refused still stores its response).
_EMPTY_ROW_COLUMNS: Final = tuple(
    message_row(
        client_id=None,
        sender_id=uuid.UUID(int=0),
        from_="",
        provider="",
        to="",
        body="",
        analysis=analyze_body(""),
        now=datetime(2000, 1, 1, tzinfo=UTC),
    )
)


async def queue_reply(
    session: AsyncSession,
    *,
    sender_id: uuid.UUID,
    from_: str,
    provider: str,
    to: str,
    body: str,
    kind: str,
) -> uuid.UUID:
    """Store one of the service's own messages (a keyword reply) in the session's transaction,
    with the same row and INSERT as a client's; it is enqueued after commit.

    Checks are the caller's (`app.inbound.service`, under the recipient's lock): an opt-out
    confirmation goes to a number that just opted out.
    """
    row = message_row(
        client_id=None,
        sender_id=sender_id,
        from_=from_,
        provider=provider,
        to=to,
        body=body,
        analysis=analyze_body(body),
        kind=kind,
        now=datetime.now(UTC),
    )
    columns = tuple(row)
    connection = await session.connection()
    # Through the session's connection (its transaction, its statement count), with the text
    # and arguments the API's path uses; asyncpg's own `$n` parameters pass through as they are.
    await connection.exec_driver_sql(
        _insert_sql(columns, "none"), (*_arguments([row], columns), "keyword")
    )
    session.info.setdefault(ENQUEUE_AFTER_COMMIT, []).append(row["id"])
    count_status(MessageStatus.QUEUED.value, provider, from_)
    log.info("message accepted", extra={"message_id": str(row["id"]), "kind": kind})
    return uuid.UUID(str(row["id"]))
