"""The accept anchor: `POST /v1/messages`'s durable work written plainly, for the benchmark.

A bare ASGI app on asyncpg, served by uvicorn as `smsgate serve` serves the service (one
process). Per request it does what an accepted single send must: parse the same request model
(`SendMessageRequest`, phone-number validation included), measure the body, find the API key
and the sender (each cached for `CACHE_SECONDS`), then in ONE statement check the recipient's
opt-out state and insert the message and its first history row into the service's own tables,
then enqueue its id to Redis (one LPUSH on a list of its own, so no worker ever takes it) and
answer 202 with the message. What it leaves out is what the service adds around that work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import pydantic
import redis.asyncio as aioredis

from app.kernel.settings import get_settings
from app.sending.encoding import analyze_body
from app.sending.schemas import SendMessageRequest

CACHE_SECONDS = 5.0
QUEUE_KEY = "bench:anchor:queue"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

FIND_KEY = """
SELECT c.id FROM api_keys k JOIN clients c ON c.id = k.client_id
WHERE k.key_hash = $1 AND k.revoked_at IS NULL
"""
FIND_SENDER = "SELECT id, address, provider FROM senders WHERE address = $1"
# The opt-out decision (the newest of the sender's own and the service-wide rows), the message
# and its first history row: one round trip. No row back means the recipient opted out.
SEND = """
WITH decision AS (
    SELECT action FROM opt_outs
    WHERE phone = $4 AND (sender_id = $3 OR sender_id IS NULL)
    ORDER BY created_at DESC, id DESC LIMIT 1
), inserted AS (
    INSERT INTO messages (id, client_id, sender_id, kind, "to", "from", body, encoding, segments,
                          status, provider, callback_url, metadata, validity_period, expires_at,
                          attempts, next_attempt_at, created_at, updated_at)
    SELECT $1, $2, $3, 'regular', $4, $5, $6, $7, $8, 'queued', $9, $10, $11::jsonb, $12::int,
           now() + make_interval(secs => $12::int), 0, now(), now(), now()
    WHERE NOT EXISTS (SELECT FROM decision WHERE action = 'opt_out')
    RETURNING id, created_at
), history AS (
    INSERT INTO message_events (message_id, status, applied, source, created_at)
    SELECT id, 'queued', true, 'api', created_at FROM inserted
)
SELECT created_at FROM inserted
"""


@dataclass
class Refused(Exception):
    """A request answered with an error status."""

    status: int
    code: str


class Cache:
    """Values by key for `CACHE_SECONDS`, as the issue allows the service's key and sender
    lookups to be cached."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[float, Any]] = {}

    async def get(self, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
        """The cached value, or `load()`'s (a None is not cached)."""
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        value = await load()
        if value is not None:
            self._entries[key] = (now + CACHE_SECONDS, value)
        return value


class Anchor:
    """The ASGI app: lifespan opens the pool and Redis; one route."""

    def __init__(self, dsn: str, redis_url: str, pool_size: int) -> None:
        self.dsn, self.redis_url, self.pool_size = dsn, redis_url, pool_size
        self.settings = get_settings()
        self.keys, self.senders = Cache(), Cache()
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None

    async def start(self) -> None:
        """Open the connections: the pool at the load's concurrency, so none is churned."""
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=self.pool_size, max_size=self.pool_size
        )
        self.redis = aioredis.Redis.from_url(self.redis_url)

    async def stop(self) -> None:
        """Close the connections."""
        if self.pool is not None:
            await self.pool.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = dict(scope["headers"])
        if scope["method"] != "POST" or scope["path"] != "/v1/messages":
            status, payload = 404, {"code": "not_found"}
        else:
            try:
                status, payload = 202, await self.accept(body, headers.get(b"authorization", b""))
            except Refused as refused:
                status, payload = refused.status, {"code": refused.code}
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        """Start and stop with the server."""
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def accept(self, body: bytes, authorization: bytes) -> dict[str, Any]:
        """Validate, look up, store in one statement, enqueue; the message as answered."""
        assert self.pool is not None and self.redis is not None
        pool = self.pool
        try:
            request = SendMessageRequest.model_validate_json(body)
        except pydantic.ValidationError as error:
            raise Refused(422, "validation_failed") from error
        client_id = await self.client_id(authorization)
        if request.from_ is None:
            raise Refused(422, "sender_required")
        address = request.from_
        sender = await self.senders.get(address, lambda: pool.fetchrow(FIND_SENDER, address))
        if sender is None:
            raise Refused(422, "unknown_sender")
        analysis = analyze_body(request.body)
        if analysis.segments > self.settings.max_segments:
            raise Refused(422, "too_many_segments")
        message_id = uuid.uuid4()
        callback_url = str(request.callback_url) if request.callback_url else None
        created_at = await pool.fetchval(
            SEND,
            message_id,
            client_id,
            sender["id"],
            request.to,
            sender["address"],
            request.body,
            analysis.encoding.value,
            analysis.segments,
            sender["provider"],
            callback_url,
            json.dumps(request.metadata),
            request.validity_period,
        )
        if created_at is None:
            raise Refused(422, "recipient_opted_out")
        await self.redis.lpush(QUEUE_KEY, str(message_id))  # type: ignore[misc]
        return {
            "id": str(message_id),
            "status": "queued",
            "to": request.to,
            "from": sender["address"],
            "body": request.body,
            "encoding": analysis.encoding.value,
            "segments": analysis.segments,
            "provider": sender["provider"],
            "callback_url": callback_url,
            "validity_period": request.validity_period,
            "metadata": request.metadata,
            "created_at": created_at.isoformat(),
        }

    async def client_id(self, authorization: bytes) -> uuid.UUID:
        """The client behind `Bearer <key>`, or 401."""
        scheme, _, raw_key = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not raw_key.strip():
            raise Refused(401, "missing_api_key")
        key_hash = hashlib.sha256(raw_key.strip().encode()).digest()
        assert self.pool is not None
        pool = self.pool
        client_id: uuid.UUID | None = await self.keys.get(
            key_hash, lambda: pool.fetchval(FIND_KEY, key_hash)
        )
        if client_id is None:
            raise Refused(401, "invalid_api_key")
        return client_id


def create_app() -> Anchor:
    """The app, configured as the service is (DATABASE_URL, REDIS_URL) plus the pool size."""
    settings = get_settings()
    return Anchor(
        settings.database_url.replace("postgresql+asyncpg://", "postgresql://", 1),
        settings.redis_url,
        int(os.environ.get("BENCH_ANCHOR_POOL", "32")),
    )


def main() -> None:
    """`python -m bench.anchor --port P`, served like `smsgate serve`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    from app.kernel.logs import logging_config
    from app.web.server import uvicorn_options

    settings = get_settings()
    uvicorn.run(
        "bench.anchor:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_config=logging_config(
            settings.log_level, settings.log_format, redact=not settings.log_message_bodies
        ),
        **uvicorn_options(settings),
    )


if __name__ == "__main__":
    main()
