"""The console's Messages section: finding messages, and one message's whole timeline.

A search is served by the messages' indexes: per client (one `LATERAL` subquery each, the
service's own replies with no client included), `(client_id, to, created_at, id)` when a number
is given, `(client_id, created_at, id)` otherwise, newest first, each stopping after a page; the
pages are then merged, and only the merged page is joined to the clients' names. Status and
sender are not in those indexes (each index on `messages` costs the accept path): they are
checked row by row, so a search without a number is bounded by a time range — the last 24 hours
unless given, at most `MAX_RANGE_WITHOUT_NUMBER` — which the index condition carries. A number is
read in any format: a national one in the chosen sender's country (else `DEFAULT_REGION`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

from sqlalchemy import Select, exc, func, select, true, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, Message, Sender
from app.db.session import sqlstate_of
from app.kernel.errors import ValidationFailed
from app.kernel.pagination import decode_cursor, encode_cursor
from app.kernel.phone import canonical_phone, number_facts
from app.kernel.status import MessageStatus

log = logging.getLogger(__name__)

PAGE_SIZE = 25
DEFAULT_RANGE = timedelta(hours=24)
# A search without a number reads every message of the range that status and sender (checked
# row by row) turn away until a page is found: without a client either, each client's lateral
# subquery may read its whole range, so one page may cost a week of every client's traffic.
MAX_RANGE_WITHOUT_NUMBER = timedelta(days=7)
# What a search's statement may take: a slower one is cancelled by PostgreSQL and the page says
# so, rather than holding a connection (and the operator) for as long as it would run.
SEARCH_TIMEOUT = timedelta(seconds=5)
QUERY_CANCELED: Final = "57014"


class SearchTooSlow(Exception):
    """The search took longer than `SEARCH_TIMEOUT` and was cancelled."""


@dataclass(frozen=True, slots=True)
class Choice:
    """An option of a select box."""

    value: str
    label: str


@dataclass(frozen=True, slots=True)
class SearchForm:
    """The search as typed, the filters read from it, and what was wrong with it, by field."""

    raw: Mapping[str, str]
    number: str | None = None
    status: str | None = None
    sender_id: uuid.UUID | None = None
    client_id: uuid.UUID | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    cursor: tuple[datetime, uuid.UUID] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def query_without_cursor(self) -> str:
        """The search's query string, from its first page."""
        return urlencode({k: v for k, v in self.raw.items() if v and k != "cursor"})


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One message in the results (no body)."""

    id: uuid.UUID
    created_at: datetime
    to: str
    from_: str
    status: str
    kind: str
    segments: int
    client: str | None


@dataclass(frozen=True, slots=True)
class Results:
    """A page of results, newest first, and the cursor of the next page."""

    rows: list[MessageRow]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Choices:
    """What the search form offers: statuses, senders, clients."""

    statuses: list[str]
    senders: list[Choice]
    clients: list[Choice]


FIELDS = ("number", "status", "sender", "client", "from", "to", "cursor")


async def choices(session: AsyncSession) -> Choices:
    """The senders and clients to filter by (small tables), and every status."""
    senders = await session.execute(select(Sender.id, Sender.address).order_by(Sender.address))
    clients = await session.execute(select(Client.id, Client.name).order_by(Client.name))
    return Choices(
        statuses=[status.value for status in MessageStatus],
        senders=[Choice(str(row.id), row.address) for row in senders],
        clients=[Choice(str(row.id), row.name) for row in clients],
    )


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _when(value: str) -> datetime | None:
    """A `datetime-local` value (or an ISO time), read as UTC unless it carries an offset."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


async def read_search(
    session: AsyncSession, raw: Mapping[str, str], default_region: str
) -> SearchForm:
    """The filters of a search as typed; a field that cannot be read is named in `errors`."""
    values = {name: (raw.get(name) or "").strip() for name in FIELDS}
    errors: dict[str, str] = {}

    def read(name: str, parse: Callable[[str], Any], reason: str) -> Any:
        if not values[name]:
            return None
        parsed = parse(values[name])
        if parsed is None:
            errors[name] = reason
        return parsed

    sender_id = read("sender", _uuid, "not one of the choices")
    region = await _region(session, sender_id, default_region)
    number = read("number", lambda typed: canonical_phone(typed, region), "not a phone number")
    created_from = read("from", _when, "not a date and time")
    created_to = read("to", _when, "not a date and time")
    if not values["number"] and not {"from", "to"} & errors.keys():
        created_from = _bounded_start(values, created_from, created_to, errors)
    return SearchForm(
        raw=values,
        number=number,
        status=read("status", _status, "not a message status"),
        sender_id=sender_id,
        client_id=read("client", _uuid, "not one of the choices"),
        created_from=created_from,
        created_to=created_to,
        cursor=read("cursor", _cursor, "not a cursor of this search"),
        errors=errors,
    )


def _bounded_start(
    values: dict[str, str],
    created_from: datetime | None,
    created_to: datetime | None,
    errors: dict[str, str],
) -> datetime | None:
    """The start of a search without a number: the 24 hours before its end (or now) when not
    given, written into the form (so that its pages keep it); a range longer than
    `MAX_RANGE_WITHOUT_NUMBER` is refused on `from`."""
    end = created_to or datetime.now(UTC)
    if created_from is None:
        created_from = (end - DEFAULT_RANGE).replace(second=0, microsecond=0)
        values["from"] = created_from.strftime("%Y-%m-%dT%H:%M")
    elif end - created_from > MAX_RANGE_WITHOUT_NUMBER:
        errors["from"] = (
            f"more than {MAX_RANGE_WITHOUT_NUMBER.days} days before the end of the search"
            " without a number: narrow the range or give a number"
        )
    return created_from


def _status(value: str) -> str | None:
    return value if value in set(MessageStatus) else None


def _cursor(value: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        return decode_cursor(value, uuid.UUID)
    except ValidationFailed:
        return None


async def _region(session: AsyncSession, sender_id: uuid.UUID | None, default: str) -> str:
    """Where a national-format number is read: the sender's country (its number's, else the
    first it serves), else the service's default."""
    if sender_id is None:
        return default
    sender = await session.get(Sender, sender_id)
    if sender is None:
        return default
    region, _ = number_facts(sender.address) if sender.address.startswith("+") else (None, 0)
    return region or (sender.countries or [default])[0]


def _page_of(
    search: SearchForm,
) -> Select[uuid.UUID, datetime, str, str, str, str, int, uuid.UUID | None]:
    """A page of one client's matching messages (the client compared below), newest first:
    one index range scan, bounded by the search's time range when it has no number."""
    query = select(
        Message.id,
        Message.created_at,
        Message.to,
        Message.from_.label("from_"),
        Message.status,
        Message.kind,
        Message.segments,
        Message.client_id,
    )
    if search.number is not None:
        query = query.where(Message.to == search.number)
    if search.status is not None:
        query = query.where(Message.status == search.status)
    if search.sender_id is not None:
        query = query.where(Message.sender_id == search.sender_id)
    if search.created_from is not None:
        query = query.where(Message.created_at >= search.created_from)
    if search.created_to is not None:
        query = query.where(Message.created_at < search.created_to)
    if search.cursor is not None:
        query = query.where(tuple_(Message.created_at, Message.id) < tuple_(*search.cursor))
    return query.order_by(Message.created_at.desc(), Message.id.desc()).limit(PAGE_SIZE + 1)


def search_statement(search: SearchForm) -> Select[Any]:
    """The statement of a page of `search`'s results (one more row than a page: is there a
    next one?)."""
    if search.client_id is not None:
        page = _page_of(search).where(Message.client_id == search.client_id).subquery()
    else:
        # Per client, through the index, then merged: no index serves "every client".
        per_client = _page_of(search).where(Message.client_id == Client.id).correlate(Client)
        lateral = per_client.lateral()
        merged = union_all(
            select(lateral).select_from(Client.__table__.join(lateral, true())),
            _page_of(search).where(Message.client_id.is_(None)),
        ).subquery()
        page = (
            select(merged)
            .order_by(merged.c.created_at.desc(), merged.c.id.desc())
            .limit(PAGE_SIZE + 1)
            .subquery()
        )
    # The clients' names are joined to the page only, never to the messages before the limit:
    # the plan then cannot hinge on the estimates of `clients`.
    return (
        select(
            page.c.id,
            page.c.created_at,
            page.c.to,
            page.c.from_,
            page.c.status,
            page.c.kind,
            page.c.segments,
            Client.name,
        )
        .outerjoin(Client, Client.id == page.c.client_id)
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


async def search_messages(session: AsyncSession, search: SearchForm) -> Results:
    """A page of the messages matching `search`, newest first (bodies not read);
    `SearchTooSlow` when it runs longer than `SEARCH_TIMEOUT`."""
    timeout_ms = str(max(1, round(SEARCH_TIMEOUT.total_seconds() * 1000)))
    # In a savepoint, always rolled back (the search writes nothing): the timeout, set for the
    # transaction (SET LOCAL), ends with it, and a cancelled search leaves the request's
    # transaction usable for the rest of the page.
    savepoint = await session.begin_nested()
    try:
        await session.execute(select(func.set_config("statement_timeout", timeout_ms, True)))
        rows = (await session.execute(search_statement(search))).all()
    except exc.DBAPIError as error:
        if sqlstate_of(error) != QUERY_CANCELED:
            raise
        seconds = f"{SEARCH_TIMEOUT.total_seconds():g}"
        raise SearchTooSlow(f"The search took longer than {seconds} s and was stopped") from None
    finally:
        await savepoint.rollback()
    page = [MessageRow(*row) for row in rows[:PAGE_SIZE]]
    more = len(rows) > PAGE_SIZE
    return Results(page, encode_cursor(page[-1].created_at, page[-1].id) if more else None)
