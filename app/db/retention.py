"""Retention: how long each kind of data lives, and the job that prunes it (README, "Retention").

Every kind is pruned in batches of `RETENTION__BATCH_SIZE` rows, each batch a short transaction
of its own (a statement that finds the oldest rows past their period by an index, and deletes or
redacts them), at most `RETENTION__MAX_BATCHES_PER_RUN` batches per kind per run: a backlog (the
first run on a database of a year) is worked off over several runs, and no run holds locks or
a snapshot for long. Rows still needed are never touched: bodies and history of messages not yet
submitted (a lookup matches on the body), pending events, the endpoints events still use, the
opt-out row that decides a number's current state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import text

from app.db.session import SessionFactory
from app.kernel.metrics import RETENTION_PRUNED
from app.kernel.settings import RetentionSettings

# The advisory lock a retention run holds while it runs (session-level; other advisory locks are
# transaction-level and keyed in spaces of their own).
_RUN_LOCK: Final = 0x7265_7465_6E74

# Messages whose body and history are still needed: not yet (known to be) submitted (a held
# message may still be released, a scheduled one waits for its time).
_IN_FLIGHT: Final = "('held', 'scheduled', 'queued', 'sending')"

# Each kind's batch: one statement, `:days` (or `:hours`) and `:limit` as parameters, answering
# one row per row pruned.
_BATCHES: Final[dict[str, str]] = {
    "message_bodies": f"""
        UPDATE messages SET body = '', body_redacted_at = now()
        WHERE id IN (
            SELECT id FROM messages
            WHERE body_redacted_at IS NULL
                AND created_at < now() - make_interval(days => :days)
                AND status NOT IN {_IN_FLIGHT}
            ORDER BY created_at
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        RETURNING 1""",
    "message_events": f"""
        DELETE FROM message_events WHERE id IN (
            SELECT event.id FROM message_events AS event
            JOIN messages AS message ON message.id = event.message_id
            WHERE event.created_at < now() - make_interval(days => :days)
                AND message.status NOT IN {_IN_FLIGHT}
            LIMIT :limit
        )
        RETURNING 1""",
    "webhook_events": """
        DELETE FROM webhook_events WHERE seq IN (
            SELECT seq FROM webhook_events
            WHERE created_at < now() - make_interval(days => :days) AND status <> 'pending'
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        RETURNING 1""",
    "webhook_attempts": """
        DELETE FROM webhook_attempts WHERE id IN (
            SELECT id FROM webhook_attempts
            WHERE created_at < now() - make_interval(days => :days)
            LIMIT :limit
        )
        RETURNING 1""",
    "inbound_parts": """
        DELETE FROM inbound_parts WHERE (provider, provider_message_id) IN (
            SELECT provider, provider_message_id FROM inbound_parts
            WHERE created_at < now() - make_interval(days => :days)
            LIMIT :limit
        )
        RETURNING 1""",
    "idempotency_keys": """
        DELETE FROM idempotency_keys WHERE (client_id, key) IN (
            SELECT client_id, key FROM idempotency_keys
            WHERE created_at < now() - make_interval(hours => :hours)
            ORDER BY created_at
            LIMIT :limit
        )
        RETURNING 1""",
    "opt_out_history": """
        DELETE FROM opt_outs WHERE id IN (
            SELECT id FROM opt_outs AS row
            WHERE created_at < now() - make_interval(days => :days)
                AND NOT EXISTS (
                    SELECT FROM opt_out_states AS state WHERE state.history_id = row.id
                )
            LIMIT :limit
        )
        RETURNING 1""",
    # Operator console sessions past their end (app.console.sessions); `:hours` is 0.
    "console_sessions": """
        DELETE FROM console_sessions WHERE token_hash IN (
            SELECT token_hash FROM console_sessions
            WHERE expires_at < now() - make_interval(hours => :hours)
            ORDER BY expires_at
            LIMIT :limit
        )
        RETURNING 1""",
    "sender_affinity": """
        DELETE FROM sender_affinity WHERE (client_id, recipient) IN (
            SELECT client_id, recipient FROM sender_affinity
            WHERE last_used_at < now() - make_interval(days => :days)
            ORDER BY last_used_at
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        RETURNING 1""",
}

# Callback-URL endpoints (a client's, not its default) unchanged for the events' period: locked
# first (skipping any an event is being written for), then deleted if no event uses them, in a
# second statement that sees every event committed meanwhile (the lock stops new ones).
_LOCK_IDLE_ENDPOINTS: Final = """
    SELECT endpoint.id FROM webhook_endpoints AS endpoint
    WHERE endpoint.client_id IS NOT NULL AND NOT endpoint.is_default
        AND endpoint.updated_at < now() - make_interval(days => :days)
        AND NOT EXISTS (SELECT FROM webhook_events AS event WHERE event.endpoint_id = endpoint.id)
    ORDER BY endpoint.updated_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED"""
_DELETE_IDLE_ENDPOINTS: Final = """
    DELETE FROM webhook_endpoints AS endpoint
    WHERE id = ANY(CAST(:ids AS uuid[]))
        AND NOT EXISTS (SELECT FROM webhook_events AS event WHERE event.endpoint_id = endpoint.id)
    RETURNING 1"""


@dataclass(frozen=True, slots=True)
class Period:
    """One kind of data and how long it lives."""

    kind: str
    days: int | None = None
    hours: int | None = None


def periods(settings: RetentionSettings, idempotency_ttl_hours: int) -> list[Period]:
    """The kinds to prune under these settings (a kind kept for ever is left out)."""
    days = {
        "message_bodies": settings.message_body_days,
        "message_events": settings.message_event_days,
        "webhook_events": settings.webhook_event_days,
        "webhook_endpoints": settings.webhook_event_days,
        "webhook_attempts": settings.webhook_attempt_days,
        "inbound_parts": settings.inbound_part_days,
        "opt_out_history": settings.opt_out_history_days,
        "sender_affinity": settings.sender_affinity_days,
    }
    chosen = [Period(kind, days=value) for kind, value in days.items() if value is not None]
    return [
        *chosen,
        Period("idempotency_keys", hours=idempotency_ttl_hours),
        # A console session is useless once it has ended: deleted as soon as it has.
        Period("console_sessions", hours=0),
    ]


async def prune_batch(session_factory: SessionFactory, period: Period, limit: int) -> int:
    """Prune at most `limit` rows of one kind past its period, in one transaction: how many."""
    async with session_factory.begin() as session:
        if period.kind == "webhook_endpoints":
            ids = list(
                await session.scalars(
                    text(_LOCK_IDLE_ENDPOINTS), {"days": period.days, "limit": limit}
                )
            )
            if not ids:
                return 0
            result = await session.execute(text(_DELETE_IDLE_ENDPOINTS), {"ids": ids})
        else:
            age = {"hours": period.hours} if period.hours is not None else {"days": period.days}
            result = await session.execute(text(_BATCHES[period.kind]), {**age, "limit": limit})
        pruned = len(result.all())
    RETENTION_PRUNED.labels(kind=period.kind).inc(pruned)
    return pruned


async def prune(
    session_factory: SessionFactory, settings: RetentionSettings, idempotency_ttl_hours: int
) -> dict[str, int]:
    """One retention run: each kind in batches until none is left past its period or the run's
    batches are used up. Rows pruned, by kind; nothing when another run is still going (a run may
    outlast the interval between runs, and two would fight over the same rows)."""
    async with session_factory() as holder:
        # Autocommit: the lock is the session's, and no transaction (nor snapshot) is held.
        connection = await holder.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        locked = await connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": _RUN_LOCK}
        )
        if not locked:
            return {}
        try:
            return await _prune(session_factory, settings, idempotency_ttl_hours)
        finally:
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _RUN_LOCK})


async def _prune(
    session_factory: SessionFactory, settings: RetentionSettings, idempotency_ttl_hours: int
) -> dict[str, int]:
    pruned: dict[str, int] = {}
    for period in periods(settings, idempotency_ttl_hours):
        total = 0
        for _ in range(settings.max_batches_per_run):
            count = await prune_batch(session_factory, period, settings.batch_size)
            total += count
            if count < settings.batch_size:
                break
        pruned[period.kind] = total
    return pruned
