"""API keys and senders as the send path needs them, cached per process for a few seconds.

Every send looks up its key and its sender; both change rarely. Each API process keeps what it
read for `LOOKUP_CACHE_SECONDS` (0: not at all), so a revoked key or a changed sender is honoured
by the other processes for at most that long, and by the process that made the change not at all
(it forgets the entry when its transaction commits). Only what exists is cached: an unknown key or
sender is looked up again every time, so a new one works at once. A sender's keyword readiness is
computed once per lookup, not per message.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from app.db.pg import Database, fetch
from app.domain.auth import Principal, api_key_from_header, hash_key, unknown_key
from app.domain.keywords import KeywordConfig, missing_replies
from app.domain.phone import InvalidPhoneNumber, normalize_phone
from app.domain.senders import PHONE_LIKE, no_default_sender, sender_not_found, unknown_sender
from app.errors import PolicyRefusal

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Beyond this many entries a cache starts afresh (a bound, not an eviction policy: real keys and
# senders are few, and misses are never cached).
MAX_ENTRIES: Final = 10_000


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

    def refusal(self) -> PolicyRefusal | None:
        """The refusal of a sender whose keyword replies are incomplete, else None."""
        if not self.missing_replies:
            return None
        return PolicyRefusal(
            "sender_keywords_incomplete",
            f"sender {self.address} cannot send until its keyword replies are configured; "
            f"missing: {', '.join(self.missing_replies)}",
        )


_PRINCIPAL_SQL: Final = """
SELECT c.id, c.name, c.default_sender_id, k.is_admin
FROM api_keys AS k JOIN clients AS c ON c.id = k.client_id
WHERE k.key_hash = $1 AND k.revoked_at IS NULL
"""
_SENDER_COLUMNS: Final = "id, address, provider, keywords::text AS keywords"
_SENDER_BY_ID_SQL: Final = f"SELECT {_SENDER_COLUMNS} FROM senders WHERE id = $1"
# The address as written first, then its canonical phone form (`find_sender_by_address`).
_SENDER_BY_ADDRESS_SQL: Final = f"""
SELECT {_SENDER_COLUMNS} FROM senders WHERE address = ANY($1::text[])
ORDER BY array_position($1::text[], address::text) LIMIT 1
"""


class Lookups:
    """The per-process caches of principals (by key hash) and senders (by id and address)."""

    def __init__(self, db: Database, *, ttl: float, accept_default_replies: bool) -> None:
        self._db = db
        self._accept_defaults = accept_default_replies
        self._principals: TtlCache[bytes, Principal] = TtlCache(ttl)
        self._senders_by_id: TtlCache[uuid.UUID, SenderInfo] = TtlCache(ttl)
        self._senders_by_address: TtlCache[str, SenderInfo] = TtlCache(ttl)

    async def principal(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization: Bearer <key>` header, or `Unauthorized`."""
        key_hash = hash_key(api_key_from_header(authorization))
        principal = await self._principals.get_or_load(
            key_hash, lambda: self._load_principal(key_hash)
        )
        if principal is None:
            raise unknown_key()
        return principal

    async def _load_principal(self, key_hash: bytes) -> Principal | None:
        async with self._db.connection() as connection:
            rows = await fetch(connection, _PRINCIPAL_SQL, key_hash, autocommit=True)
        if not rows:
            return None
        client_id, name, default_sender_id, is_admin = rows[0]
        return Principal(client_id, name, default_sender_id, is_admin)

    async def sender(
        self, address: str | None, default_sender_id: uuid.UUID | None, default_region: str
    ) -> SenderInfo:
        """The sender a message goes out from: the one named (`find_sender_by_address`'s rule),
        or the client's default."""
        if address is None:
            if default_sender_id is None:
                raise no_default_sender()
            sender = await self._senders_by_id.get_or_load(
                default_sender_id, lambda: self._load_sender(_SENDER_BY_ID_SQL, default_sender_id)
            )
            if sender is None:
                raise sender_not_found(default_sender_id)
            return sender
        sender = await self._senders_by_address.get_or_load(
            address,
            lambda: self._load_sender(_SENDER_BY_ADDRESS_SQL, _spellings(address, default_region)),
        )
        if sender is None:
            raise unknown_sender(address)
        return sender

    async def _load_sender(self, sql: str, argument: Any) -> SenderInfo | None:
        async with self._db.connection() as connection:
            rows = await fetch(connection, sql, argument, autocommit=True)
        if not rows:
            return None
        sender_id, address, provider, keywords = rows[0]
        config = KeywordConfig.model_validate(json.loads(keywords))
        sender = SenderInfo(
            id=sender_id,
            address=address,
            provider=provider,
            missing_replies=tuple(missing_replies(config, accept_defaults=self._accept_defaults)),
        )
        return sender

    def forget_sender(self, sender_id: uuid.UUID) -> None:
        """Drop a changed sender, under every address it was looked up by."""
        self._senders_by_id.discard_where(lambda sender: sender.id == sender_id)
        self._senders_by_address.discard_where(lambda sender: sender.id == sender_id)

    def forget_principals(self) -> None:
        """Drop every cached key (after a revocation, or a client's default sender changed)."""
        self._principals.clear()

    def forget_all(self) -> None:
        """Drop everything (what was cached turned out to be gone)."""
        for cache in (self._principals, self._senders_by_id, self._senders_by_address):
            cache.clear()


def _spellings(address: str, default_region: str) -> list[str]:
    """The address as written and, for a phone-like one, its canonical E.164 form."""
    if not PHONE_LIKE.match(address):
        return [address]
    try:
        return [address, normalize_phone(address, default_region)]
    except InvalidPhoneNumber:
        return [address]
