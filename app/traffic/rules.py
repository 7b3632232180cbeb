"""Each client's traffic rules: the destination countries it may send to and its limits.

The service-wide defaults are settings (TRAFFIC__*); an admin may give a client a narrower list
of countries and limits of its own (`client_traffic`, `PUT /v1/clients/{client}/traffic`). The
accept pipeline reads a client's rules through a per-process cache (`LOOKUP_CACHE_SECONDS`, as
keys and senders), so a send costs no statement for them in the common case; a change is seen at
once by the process that made it and within the cache's lifetime by the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.access.lookups import TtlCache
from app.db.models import Client, ClientTraffic
from app.db.pg import Database, fetch
from app.kernel.errors import NotFound, ValidationFailed
from app.kernel.settings import TrafficSettings

LIMIT_FIELDS: Final = (
    "messages_per_minute",
    "segments_per_minute",
    "messages_per_day",
    "segments_per_day",
)


@dataclass(frozen=True, slots=True)
class Limits:
    """A client's limits in force (0: unlimited)."""

    messages_per_minute: int = 0
    segments_per_minute: int = 0
    messages_per_day: int = 0
    segments_per_day: int = 0

    @property
    def unlimited(self) -> bool:
        """No limit at all: no quota is counted (and Redis is not asked)."""
        return not any(
            (
                self.messages_per_minute,
                self.segments_per_minute,
                self.messages_per_day,
                self.segments_per_day,
            )
        )


@dataclass(frozen=True, slots=True)
class ClientRules:
    """What an admin set for a client; None: the service's default."""

    permitted_countries: frozenset[str] | None = None
    messages_per_minute: int | None = None
    segments_per_minute: int | None = None
    messages_per_day: int | None = None
    segments_per_day: int | None = None

    def countries(self, settings: TrafficSettings) -> frozenset[str]:
        """The countries the client may send to now: its own list within the service's."""
        service = frozenset(settings.permitted_countries)
        if self.permitted_countries is None:
            return service
        return self.permitted_countries & service

    def limits(self, settings: TrafficSettings) -> Limits:
        """The limits in force: the client's own where set, else the service's."""
        return Limits(
            *(
                own if (own := getattr(self, name)) is not None else getattr(settings, name)
                for name in LIMIT_FIELDS
            )
        )


NO_RULES: Final = ClientRules()

_RULES_SQL: Final = f"""
SELECT permitted_countries, {", ".join(LIMIT_FIELDS)} FROM client_traffic WHERE client_id = $1
"""


class RuleCache:
    """Clients' rules, cached per process (a client without rules is cached too)."""

    def __init__(self, db: Database, *, ttl: float) -> None:
        self._db = db
        self._cache: TtlCache[uuid.UUID, ClientRules] = TtlCache(ttl)

    async def rules(self, client_id: uuid.UUID) -> ClientRules:
        """The client's rules (one statement per client per cache lifetime)."""
        found = await self._cache.get_or_load(client_id, lambda: self._load(client_id))
        return found or NO_RULES

    async def _load(self, client_id: uuid.UUID) -> ClientRules:
        async with self._db.connection() as connection:
            rows = await fetch(connection, _RULES_SQL, client_id, autocommit=True)
        if not rows:
            return NO_RULES
        countries, *limits = rows[0]
        return ClientRules(None if countries is None else frozenset(countries), *limits)

    def forget(self) -> None:
        """Drop every client's rules (an admin changed some)."""
        self._cache.clear()


# ---- Admin: reading and setting a client's rules ------------------------------------------


async def _client_id(session: AsyncSession, client_name: str) -> uuid.UUID:
    client_id = await session.scalar(select(Client.id).where(Client.name == client_name))
    if client_id is None:
        raise NotFound("client_not_found", f"no client named {client_name!r}")
    return client_id


async def get_rules(session: AsyncSession, client_name: str) -> ClientRules:
    """A client's rules as an admin set them (all None: the defaults)."""
    client_id = await _client_id(session, client_name)
    row = await session.get(ClientTraffic, client_id)
    if row is None:
        return NO_RULES
    return _rules_of(row)


def _rules_of(row: ClientTraffic) -> ClientRules:
    countries = row.permitted_countries
    return ClientRules(
        None if countries is None else frozenset(countries),
        *(getattr(row, name) for name in LIMIT_FIELDS),
    )


def unmeetable_segment_limit(limits: Mapping[str, int | None], max_segments: int) -> str | None:
    """The first segment limit (by name) that a message of `max_segments` segments, which the
    service accepts, could never fit in: every such message would be refused forever."""
    for name in ("segments_per_minute", "segments_per_day"):
        value = limits.get(name)
        if value and value < max_segments:
            return name
    return None


async def set_rules(
    session: AsyncSession,
    client_name: str,
    rules: ClientRules,
    settings: TrafficSettings,
    *,
    max_segments: int,
) -> ClientRules:
    """Replace a client's rules. Its countries must be within the service's list: a client's
    list only narrows it; a segment limit must fit one message of `max_segments` (MAX_SEGMENTS)
    segments (422 otherwise, naming the field)."""
    client_id = await _client_id(session, client_name)
    unmeetable = unmeetable_segment_limit(
        {name: getattr(rules, name) for name in LIMIT_FIELDS}, max_segments
    )
    if unmeetable is not None:
        raise ValidationFailed.for_field(
            "limit_below_max_segments",
            unmeetable,
            f"below the {max_segments} segments one message may have (MAX_SEGMENTS): a message "
            "that long could never be sent; set at least that, or 0 for unlimited",
        )
    if rules.permitted_countries is not None:
        outside = sorted(rules.permitted_countries - set(settings.permitted_countries))
        if outside:
            raise ValidationFailed.for_field(
                "country_not_permitted_by_service",
                "permitted_countries",
                f"{', '.join(outside)} not in the service's list "
                f"({', '.join(settings.permitted_countries)})",
            )
    values = {
        "permitted_countries": None
        if rules.permitted_countries is None
        else sorted(rules.permitted_countries),
        **{name: getattr(rules, name) for name in LIMIT_FIELDS},
    }
    await session.execute(
        insert(ClientTraffic)
        .values(client_id=client_id, **values)
        .on_conflict_do_update(
            index_elements=[ClientTraffic.client_id], set_={**values, "updated_at": func.now()}
        )
    )
    return rules
