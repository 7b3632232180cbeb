"""API keys and senders as the send path needs them, cached per process for a few seconds.

Every send looks up its key and its sender; both change rarely. Each API process keeps what it
read for `LOOKUP_CACHE_SECONDS` (0: not at all), so a revoked key or a changed sender is honoured
by the other processes for at most that long, and by the process that made the change not at all
(it forgets the entry when its transaction commits). Only what exists is cached: an unknown key or
sender is looked up again every time, so a new one works at once. A sender's keyword readiness is
computed once per lookup, not per message.

A sender carries the set of clients it is granted to, so the ownership check of a send is made
on the cached sender, with no statement of its own. A send the cached sender refuses reads the
sender again before refusing, so a new grant works at once everywhere; a revocation is seen at
once by the process that made it and within `LOOKUP_CACHE_SECONDS` by the others. A key's
expiry is checked on every use, cached or not. Loading a key (at most once per TTL per process)
also records its last use, written only when the stored one is a minute old: no request writes
for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from app.access.auth import Principal, api_key_from_header, hash_key, unknown_key
from app.db.pg import Database, fetch
from app.kernel.errors import PolicyRefusal
from app.kernel.phone import InvalidPhoneNumber, normalize_phone
from app.kernel.quiet_hours import quiet_hours_of
from app.kernel.secrets import installed
from app.senders.keywords import KeywordConfig, missing_replies
from app.senders.service import (
    PHONE_LIKE,
    no_default_sender,
    sender_not_found,
    served_countries,
    unknown_sender,
)
from app.twilio_api.vocabulary import ACCOUNT_PREFIX, parse_sid

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Beyond this many entries a cache starts afresh (a bound, not an eviction policy: real keys and
# senders are few, and misses are never cached).
MAX_ENTRIES: Final = 10_000

# How stale a key's `last_used_at` may be: it is written at most this often.
LAST_USED_RESOLUTION_SECONDS: Final = 60


class TtlCache(Generic[K, V]):
    """Values kept for `ttl` seconds after they were read (0: never kept)."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._entries: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V | None]] = {}
        # Bumped by every forgetting: a load that began before it is not kept.
        self._generation = 0

    def get(self, key: K) -> V | None:
        """The value, unless absent or older than the TTL."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        """Keep `value` for the TTL."""
        if self._ttl <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self._ttl, value)

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The cached value, else what `load()` finds (None: nothing, not kept). Concurrent misses
        of one key share one load: an expiry under load costs one query, not one per request."""
        value = self.get(key)
        if value is not None:
            return value
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load, self._generation))
            self._loading[key] = pending
            pending.add_done_callback(lambda done: self._loaded(key, done))
        # Shielded: one waiter cancelled (its client gone) does not cancel the others' load.
        return await asyncio.shield(pending)

    async def _load(
        self, key: K, load: Callable[[], Awaitable[V | None]], generation: int
    ) -> V | None:
        value = await load()
        if value is not None and generation == self._generation:
            self.put(key, value)
        return value

    def _loaded(self, key: K, done: asyncio.Future[V | None]) -> None:
        if self._loading.get(key) is done:
            del self._loading[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone

    async def reload(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """What `load()` finds now, whatever was cached (kept as `get_or_load` keeps it)."""
        self._entries.pop(key, None)
        return await self.get_or_load(key, load)

    def discard_where(self, stale: Callable[[V], bool]) -> None:
        """Forget every entry whose value `stale(value)` is true (and loads under way)."""
        self._generation += 1
        self._loading.clear()
        for key in [key for key, (_, value) in self._entries.items() if stale(value)]:
            del self._entries[key]

    def clear(self) -> None:
        """Forget everything."""
        self.discard_where(lambda _: True)


@dataclass(frozen=True, slots=True)
class SenderInfo:
    """What accepting a message needs of its sender."""

    id: uuid.UUID
    address: str
    provider: str
    # Keyword replies still to configure before it may send ([] when ready).
    missing_replies: tuple[str, ...]
    # The clients it is granted to (`sender_clients`): only they may send from it.
    client_ids: frozenset[uuid.UUID] = frozenset()
    # Its pace, and the destination countries it serves when picked from a pool.
    rate_per_second: float = 1.0
    countries: frozenset[str] = frozenset()

    def usable_by(self, principal: Principal) -> bool:
        """Whether the caller may send from it: a client it is granted to, or an admin key."""
        return principal.is_admin or principal.client_id in self.client_ids

    def refusal(self) -> PolicyRefusal | None:
        """The refusal of a sender whose keyword replies are incomplete, else None."""
        if not self.missing_replies:
            return None
        return PolicyRefusal(
            "sender_keywords_incomplete",
            f"sender {self.address} cannot send until its keyword replies are configured; "
            f"missing: {', '.join(self.missing_replies)}",
        )


# The key, and its last use recorded in the same statement when the stored one is over a
# minute old (a key in steady use is written once a minute, whatever the request rate).
_PRINCIPAL_SQL: Final = f"""
WITH found AS (
    SELECT c.id, c.name, c.default_sender_id, k.is_admin, k.id AS key_id, k.expires_at,
        c.pumping::text AS pumping, c.quiet_hours_start, c.quiet_hours_end
    FROM api_keys AS k JOIN clients AS c ON c.id = k.client_id
    WHERE k.key_hash = $1 AND k.revoked_at IS NULL
        AND (k.expires_at IS NULL OR k.expires_at > now())
), touched AS (
    UPDATE api_keys SET last_used_at = now()
    WHERE id = (SELECT key_id FROM found)
        AND (last_used_at IS NULL
             OR last_used_at < now() - make_interval(secs => {LAST_USED_RESOLUTION_SECONDS}))
)
SELECT * FROM found
"""
# A client's Twilio credentials (the token as stored: encrypted).
_TWILIO_SQL: Final = """
SELECT c.id, c.name, c.default_sender_id, t.auth_token, c.pumping::text AS pumping,
    c.quiet_hours_start, c.quiet_hours_end
FROM twilio_credentials AS t JOIN clients AS c ON c.id = t.client_id
WHERE t.client_id = $1
"""
_SENDER_COLUMNS: Final = """id, address, provider, keywords::text AS keywords,
    ARRAY(SELECT client_id FROM sender_clients WHERE sender_id = senders.id) AS client_ids,
    kind, countries, rate_per_second"""
_SENDER_BY_ID_SQL: Final = f"SELECT {_SENDER_COLUMNS} FROM senders WHERE id = $1"
# The address as written first, then its canonical phone form (`find_sender_by_address`).
_SENDER_BY_ADDRESS_SQL: Final = f"""
SELECT {_SENDER_COLUMNS} FROM senders WHERE address = ANY($1::text[])
ORDER BY array_position($1::text[], address::text) LIMIT 1
"""
# A client's pool: every sender granted to it (`app.traffic.pools` keeps those serving countries).
_POOL_SQL: Final = f"""
SELECT {_SENDER_COLUMNS} FROM senders
WHERE id IN (SELECT sender_id FROM sender_clients WHERE client_id = $1)
ORDER BY id
"""


def _json(text: str | None) -> dict[str, Any] | None:
    """A JSONB column read as text (asyncpg's raw connection has no JSON codec)."""
    return json.loads(text) if text is not None else None


class Lookups:
    """The per-process caches of principals (by key hash) and senders (by id and address)."""

    def __init__(self, db: Database, *, ttl: float, accept_default_replies: bool) -> None:
        self._db = db
        self._accept_defaults = accept_default_replies
        self._principals: TtlCache[bytes, Principal] = TtlCache(ttl)
        self._twilio_principals: TtlCache[bytes, Principal] = TtlCache(ttl)
        self._senders_by_id: TtlCache[uuid.UUID, SenderInfo] = TtlCache(ttl)
        self._senders_by_address: TtlCache[str, SenderInfo] = TtlCache(ttl)
        self._pools: TtlCache[uuid.UUID, tuple[SenderInfo, ...]] = TtlCache(ttl)

    async def principal(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization: Bearer <key>` header, or `Unauthorized`."""
        key_hash = hash_key(api_key_from_header(authorization))
        principal = await self._principals.get_or_load(
            key_hash, lambda: self._load_principal(key_hash)
        )
        if principal is None or principal.expired():
            raise unknown_key()
        return principal

    async def _load_principal(self, key_hash: bytes) -> Principal | None:
        async with self._db.connection() as connection:
            rows = await fetch(connection, _PRINCIPAL_SQL, key_hash, autocommit=True)
        if not rows:
            return None
        row = rows[0]
        return Principal(
            row["id"],
            row["name"],
            row["default_sender_id"],
            row["is_admin"],
            row["key_id"],
            row["expires_at"],
            pumping=_json(row["pumping"]),
            quiet_hours=quiet_hours_of(row["quiet_hours_start"], row["quiet_hours_end"]),
        )

    async def twilio_principal(self, account_sid: str, auth_token: str) -> Principal | None:
        """The client whose Twilio account SID and auth token these are, or None. Cached like
        keys, under a hash of the pair; a wrong pair is read (and refused) every time."""
        client_id = parse_sid(account_sid, ACCOUNT_PREFIX)
        if client_id is None or not auth_token:
            return None
        pair = hashlib.sha256(f"{account_sid}:{auth_token}".encode()).digest()

        async def load() -> Principal | None:
            async with self._db.connection() as connection:
                rows = await fetch(connection, _TWILIO_SQL, client_id, autocommit=True)
            if not rows:
                return None
            found_id, name, default_sender_id, stored, pumping, start, end = rows[0]
            if not hmac.compare_digest(installed().decrypt(stored).encode(), auth_token.encode()):
                return None
            return Principal(
                found_id,
                name,
                default_sender_id,
                is_admin=False,
                pumping=_json(pumping),
                quiet_hours=quiet_hours_of(start, end),
            )

        return await self._twilio_principals.get_or_load(pair, load)

    async def sender(
        self, address: str | None, principal: Principal, default_region: str
    ) -> SenderInfo:
        """The sender a message goes out from: the one named (`find_sender_by_address`'s rule),
        or the client's default; only one granted to the caller's client (admin keys: any).

        Another client's sender is refused exactly as an address that is no sender at all, so
        a client cannot learn which addresses exist.
        """
        if address is None:
            default_sender_id = principal.default_sender_id
            if default_sender_id is None:
                raise no_default_sender()

            def by_id() -> Awaitable[SenderInfo | None]:
                return self._load_sender(_SENDER_BY_ID_SQL, default_sender_id)

            sender = await self._senders_by_id.get_or_load(default_sender_id, by_id)
            if sender is not None and not sender.usable_by(principal):
                sender = await self._senders_by_id.reload(default_sender_id, by_id)
            if sender is None:
                raise sender_not_found(default_sender_id)
            if not sender.usable_by(principal):
                raise no_default_sender()
            return sender

        def by_address() -> Awaitable[SenderInfo | None]:
            return self._load_sender(_SENDER_BY_ADDRESS_SQL, _spellings(address, default_region))

        sender = await self._senders_by_address.get_or_load(address, by_address)
        if sender is not None and not sender.usable_by(principal):
            # Refused by what was cached: read it again, so a new grant works at once (as a new
            # sender does); a revocation waits for the cache entry to expire.
            sender = await self._senders_by_address.reload(address, by_address)
        if sender is None or not sender.usable_by(principal):
            raise unknown_sender(address)
        return sender

    async def pool(self, client_id: uuid.UUID) -> tuple[SenderInfo, ...]:
        """Every sender granted to a client, cached like a sender (a grant, a revocation or a
        change of a sender is seen at once by this process, by others within the TTL)."""

        async def load() -> tuple[SenderInfo, ...]:
            async with self._db.connection() as connection:
                rows = await fetch(connection, _POOL_SQL, client_id, autocommit=True)
            return tuple(self._sender_info(row) for row in rows)

        return await self._pools.get_or_load(client_id, load) or ()

    async def _load_sender(self, sql: str, argument: Any) -> SenderInfo | None:
        async with self._db.connection() as connection:
            rows = await fetch(connection, sql, argument, autocommit=True)
        if not rows:
            return None
        return self._sender_info(rows[0])

    def _sender_info(self, row: Any) -> SenderInfo:
        sender_id, address, provider, keywords, client_ids, kind, countries, rate = row
        config = KeywordConfig.model_validate(json.loads(keywords))
        return SenderInfo(
            id=sender_id,
            address=address,
            provider=provider,
            missing_replies=tuple(missing_replies(config, accept_defaults=self._accept_defaults)),
            client_ids=frozenset(client_ids),
            rate_per_second=rate,
            countries=served_countries(kind, address, countries),
        )

    def forget_sender(self, sender_id: uuid.UUID) -> None:
        """Drop a changed sender (its settings, or its grants), under every address it was
        looked up by, and every pool (it may have joined or left one)."""
        self._senders_by_id.discard_where(lambda sender: sender.id == sender_id)
        self._senders_by_address.discard_where(lambda sender: sender.id == sender_id)
        self._pools.clear()

    def forget_principals(self) -> None:
        """Drop every cached key (after a revocation or rotation, or a client's default sender
        changed)."""
        self._principals.clear()
        self._twilio_principals.clear()

    def forget_all(self) -> None:
        """Drop everything (what was cached turned out to be gone)."""
        for cache in (self._principals, self._senders_by_id, self._senders_by_address):
            cache.clear()
        self._twilio_principals.clear()
        self._pools.clear()


def _spellings(address: str, default_region: str) -> list[str]:
    """The address as written and, for a phone-like one, its canonical E.164 form."""
    if not PHONE_LIKE.match(address):
        return [address]
    try:
        return [address, normalize_phone(address, default_region)]
    except InvalidPhoneNumber:
        return [address]
