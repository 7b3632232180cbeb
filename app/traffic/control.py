"""Traffic control as the accept pipeline uses it: destination permissions, then quotas.

`app.sending.accept` calls `TrafficControl` twice per request: `judge_destination` for each
message while judging (no I/O: the client's rules are cached), then `take` once for the messages
still accepted (one Redis round trip, before any database transaction; none at all when the
client has no limit). Quota taken by messages that end up not stored is given back.
"""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis

from app.db.pg import Database
from app.kernel.errors import PolicyRefusal, ServiceError
from app.kernel.settings import TrafficSettings
from app.traffic.permissions import destination_refusal
from app.traffic.quotas import Quotas, Verdicts
from app.traffic.rules import ClientRules, RuleCache

TRAFFIC_REFUSALS = Counter(
    "smsgate_traffic_refusals",
    "Messages refused by traffic control, by code (destination_not_permitted, "
    "number_type_not_permitted, rate_limited, quota_exceeded, quota_unavailable).",
    ["code"],
)


class TrafficControl:
    """The service's traffic rules, each client's (cached), and the quota counters."""

    def __init__(self, db: Database, redis: Redis, settings: TrafficSettings, *, ttl: float):
        self.settings = settings
        self.rules = RuleCache(db, ttl=ttl)
        self.quotas = Quotas(redis, settings)

    async def client_rules(self, client_id: uuid.UUID) -> ClientRules:
        """The client's rules (cached)."""
        return await self.rules.rules(client_id)

    def judge_destination(self, to: str, rules: ClientRules) -> PolicyRefusal | None:
        """Why a message may not go to `to`, or None."""
        refusal = destination_refusal(to, rules.countries(self.settings), self.settings)
        if refusal is not None:
            TRAFFIC_REFUSALS.labels(refusal.code).inc()
        return refusal

    async def take(
        self,
        client_id: uuid.UUID,
        rules: ClientRules,
        judged: list[dict[str, Any] | ServiceError],
    ) -> tuple[list[dict[str, Any] | ServiceError], Verdicts | None]:
        """`judged` with the messages over a limit replaced by their 429, and the verdicts
        (None: the client has no limit, nothing was counted). Fail-closed and Redis down: every
        message gets the 503."""
        limits = rules.limits(self.settings)
        rows = [item for item in judged if isinstance(item, dict)]
        if limits.unlimited or not rows:
            return judged, None
        answer = await self.quotas.take(client_id, limits, [row["segments"] for row in rows])
        if isinstance(answer, ServiceError):
            TRAFFIC_REFUSALS.labels(answer.code).inc(len(rows))
            return [item if isinstance(item, ServiceError) else answer for item in judged], None
        refused = [answer.refusal(index) for index in range(len(rows))]
        for refusal in refused:
            if refusal is not None:
                TRAFFIC_REFUSALS.labels(refusal.code).inc()
        refusals = iter(refused)
        return [
            item if isinstance(item, ServiceError) else next(refusals) or item for item in judged
        ], answer

    async def give_back(
        self, verdicts: Verdicts | None, counted: list[dict[str, Any]], stored: set[Any]
    ) -> None:
        """Return the quota of the counted messages that were not stored (ids not in `stored`)."""
        if verdicts is None:
            return
        unstored = [row["segments"] for row in counted if row["id"] not in stored]
        await self.quotas.give_back(verdicts, unstored)


_EXAMPLES: dict[int, dict[str, tuple[str, str]]] = {
    403: {
        "destination_not_permitted": (
            "Refused",
            "+447400123456 is in GB, not a permitted destination (permitted: CA, FR, US)",
        ),
        "number_type_not_permitted": (
            "Refused",
            "+447011123456 is a personal (call-forwarding) number; such numbers are refused "
            "for transactional traffic",
        ),
    },
    429: {
        "rate_limited": (
            "Too many requests",
            "over your rate limit (100 messages per minute); retry after 12 s",
        ),
        "quota_exceeded": (
            "Too many requests",
            "over your daily quota (10000 messages per UTC day); retry after 3600 s",
        ),
    },
}

RATE_LIMIT_HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": "Seconds until the window that refused the message ends.",
        "schema": {"type": "integer", "example": 12},
    },
    "RateLimit-Policy": {
        "description": "The client's limits (draft-ietf-httpapi-ratelimit-headers-11): quota "
        "`q` per window of `w` seconds, one item per limit in force.",
        "schema": {"type": "string", "example": '"messages-minute";q=100;w=60'},
    },
    "RateLimit": {
        "description": "What is left of each limit (`r`) and the seconds until its window "
        "resets (`t`). Also sent on accepted sends when the client has limits.",
        "schema": {"type": "string", "example": '"messages-minute";r=0;t=12'},
    },
}


def document_traffic(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """`responses` (from `problem_responses`) with the traffic refusals' examples added to 403
    and 429 and the rate-limit headers documented on 429."""
    for status, examples in _EXAMPLES.items():
        entry = responses.get(status)
        if entry is None:
            continue
        content = entry["content"]["application/problem+json"]["examples"]
        for code, (title, detail) in examples.items():
            content[code] = {
                "summary": code.replace("_", " "),
                "value": {
                    "type": "about:blank",
                    "title": title,
                    "status": status,
                    "code": code,
                    "detail": detail,
                },
            }
    if 429 in responses:
        responses[429]["headers"] = RATE_LIMIT_HEADERS
        responses[429]["description"] = (
            "Over the client's per-minute rate limit (`rate_limited`) or daily quota "
            "(`quota_exceeded`); nothing was stored."
        )
    return responses
