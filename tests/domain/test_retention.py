"""Retention: each kind of data pruned after its own period, in batches, without touching what is
still needed, and without breaking what reads the rest (issue 13, item 6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client import REGISTRY
from sqlalchemy import text

from app.db.retention import prune
from app.db.session import SessionFactory
from app.kernel.settings import RetentionSettings
from app.worker.tasks import WorkerSettings, retention
from tests.api.test_idempotency import post
from tests.conftest import World, make_settings
from tests.domain.test_batch_delivery import fresh, number

NOW = datetime.now(UTC)


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


async def execute(session_factory: SessionFactory, sql: str, **params: Any) -> list[Any]:
    async with session_factory.begin() as session:
        result = await session.execute(text(sql), params)
        return list(result.all()) if result.returns_rows else []  # type: ignore[attr-defined]


async def aged_message(
    session_factory: SessionFactory, world: World, n: int, age_days: float, status: str
) -> uuid.UUID:
    message_id = await fresh(session_factory, world, number(n), status=status)
    await execute(
        session_factory,
        "UPDATE messages SET created_at = :at WHERE id = :id",
        at=days_ago(age_days),
        id=message_id,
    )
    await execute(
        session_factory,
        "INSERT INTO message_events (message_id, status, applied, source, created_at) "
        "VALUES (:id, 'queued', true, 'api', :at), (:id, :status, true, 'worker', now())",
        id=message_id,
        at=days_ago(age_days),
        status=status,
    )
    return message_id


def pruned_metric(kind: str) -> float:
    value = REGISTRY.get_sample_value("smsgate_retention_pruned_rows_total", {"kind": kind})
    return value or 0.0


async def test_message_bodies_and_history_past_their_periods_go_the_rest_stays(
    session_factory: SessionFactory, world: World
) -> None:
    old_delivered = await aged_message(session_factory, world, 1, 100, "delivered")
    old_queued = await aged_message(session_factory, world, 2, 100, "queued")  # still needed
    old_scheduled = await aged_message(session_factory, world, 4, 100, "scheduled")  # still needed
    recent = await aged_message(session_factory, world, 3, 10, "delivered")
    # Held by the pumping alarm: an admin may still release it, body and all.
    old_held = await aged_message(session_factory, world, 4, 100, "held")
    bodies_before = pruned_metric("message_bodies")

    pruned = await prune(session_factory, RetentionSettings(), 24)

    assert pruned["message_bodies"] == 1
    assert pruned["message_events"] == 1  # the old event of the old delivered message
    assert pruned_metric("message_bodies") - bodies_before == 1
    bodies = dict(
        await execute(
            session_factory, "SELECT id, body FROM messages WHERE body_redacted_at IS NOT NULL"
        )
    )
    assert bodies == {old_delivered: ""}
    events = await execute(
        session_factory, "SELECT message_id, count(*) FROM message_events GROUP BY message_id"
    )
    assert dict(events) == {
        old_delivered: 1,
        old_queued: 2,
        old_scheduled: 2,
        recent: 2,
        old_held: 2,
    }
    # Nothing left to do: a second run prunes nothing.
    assert sum((await prune(session_factory, RetentionSettings(), 24)).values()) == 0


async def test_a_pruned_message_still_reads(
    api: httpx.AsyncClient, session_factory: SessionFactory, world: World
) -> None:
    message_id = await aged_message(session_factory, world, 1, 100, "delivered")
    await execute(session_factory, "UPDATE message_events SET created_at = :at", at=days_ago(100))

    await prune(session_factory, RetentionSettings(), 24)

    response = await api.get(f"/v1/messages/{message_id}", headers=world.auth())
    assert response.status_code == 200, response.text
    assert response.json()["body"] == ""
    assert response.json()["status"] == "delivered"
    listed = await api.get("/v1/messages", params={"to": number(1)}, headers=world.auth())
    assert [item["id"] for item in listed.json()["data"]] == [str(message_id)]


async def test_batches_are_bounded_and_a_run_stops_after_its_batches(
    session_factory: SessionFactory, world: World
) -> None:
    for n in range(7):
        await aged_message(session_factory, world, n, 40, "failed")
    settings = RetentionSettings(batch_size=2, max_batches_per_run=3, message_event_days=None)

    first = await prune(session_factory, settings, 24)
    second = await prune(session_factory, settings, 24)

    assert (first["message_bodies"], second["message_bodies"]) == (6, 1)
    assert "message_events" not in first  # kept for ever when its period is empty


async def seed_events(session_factory: SessionFactory, world: World) -> dict[str, uuid.UUID]:
    """A callback-URL endpoint used only by old events, one used by a pending old event, the
    client's default endpoint; events and attempts of several ages."""
    ids = {name: uuid.uuid4() for name in ("idle", "busy", "default")}
    await execute(
        session_factory,
        "INSERT INTO webhook_endpoints (id, client_id, url, is_default, created_at, updated_at) "
        "VALUES (:idle, :client, 'https://a.example/1', false, :old, :old), "
        "(:busy, :client, 'https://a.example/2', false, :old, :old), "
        "(:default, :client, 'https://a.example/d', true, :old, :old)",
        client=world.client_id,
        old=days_ago(60),
        **ids,
    )
    events = [
        ("old_delivered", "idle", "delivered", 40),
        ("old_failed", "default", "failed", 40),
        ("old_pending", "busy", "pending", 40),
        ("recent", "default", "delivered", 5),
    ]
    for name, endpoint, status, age in events:
        ids[name] = uuid.uuid4()
        await execute(
            session_factory,
            "INSERT INTO webhook_events (id, type, client_id, endpoint_id, payload, status, "
            "created_at) VALUES (:id, 'message.delivered', :client, :endpoint, '{}', :status, "
            ":at)",
            id=ids[name],
            client=world.client_id,
            endpoint=ids[endpoint],
            status=status,
            at=days_ago(age),
        )
        for attempt_age in (age, 1):
            await execute(
                session_factory,
                "INSERT INTO webhook_attempts (event_id, number, url, status, latency_ms, "
                "created_at) VALUES (:event, 1, 'https://a.example', 'failed', 10, :at)",
                event=ids[name],
                at=days_ago(attempt_age),
            )
    return ids


async def test_events_attempts_and_idle_callback_endpoints(
    session_factory: SessionFactory, world: World
) -> None:
    ids = await seed_events(session_factory, world)

    pruned = await prune(session_factory, RetentionSettings(), 24)

    remaining = {row[0] for row in await execute(session_factory, "SELECT id FROM webhook_events")}
    assert remaining == {ids["old_pending"], ids["recent"]}
    endpoints = {
        row[0] for row in await execute(session_factory, "SELECT id FROM webhook_endpoints")
    }
    assert endpoints == {ids["busy"], ids["default"]}  # the idle callback URL's row went
    attempts = await execute(
        session_factory, "SELECT event_id, created_at FROM webhook_attempts ORDER BY created_at"
    )
    # The kept events' attempts younger than 14 days; older ones and the deleted events' went.
    assert sorted(row[0] for row in attempts) == sorted(
        [ids["old_pending"], ids["recent"], ids["recent"]]
    )
    assert (pruned["webhook_events"], pruned["webhook_endpoints"]) == (2, 1)


async def test_a_callback_url_used_again_after_its_endpoint_was_pruned_gets_a_new_one(
    session_factory: SessionFactory, world: World
) -> None:
    from app.events.endpoints import Owner, endpoint_for_url

    ids = await seed_events(session_factory, world)
    await prune(session_factory, RetentionSettings(), 24)

    async with session_factory.begin() as session:
        endpoint = await endpoint_for_url(
            session, Owner(client_id=world.client_id), "https://a.example/1"
        )

    assert endpoint.id != ids["idle"]


async def test_inbound_parts_and_idempotency_keys(
    api: httpx.AsyncClient, session_factory: SessionFactory, world: World
) -> None:
    for n, age in ((1, 10), (2, 1)):
        await execute(
            session_factory,
            'INSERT INTO inbound_parts (provider, provider_message_id, "from", "to", '
            "reference, number, total, body, payload, created_at) VALUES ('vonage', :id, "
            "'+14155550101', 'ACME', 'r', 1, 2, 'x', '{}', :at)",
            id=f"part-{n}",
            at=days_ago(age),
        )
    fresh_key = await post(api, world, "fresh-key")
    old_key = await post(api, world, "old-key", {"to": number(9), "body": "Old"})
    assert (fresh_key.status_code, old_key.status_code) == (202, 202)
    await execute(
        session_factory,
        "UPDATE idempotency_keys SET created_at = :at WHERE key = 'old-key'",
        at=NOW - timedelta(hours=30),
    )

    pruned = await prune(session_factory, RetentionSettings(), 24)

    assert (pruned["inbound_parts"], pruned["idempotency_keys"]) == (1, 1)
    parts = await execute(session_factory, "SELECT provider_message_id FROM inbound_parts")
    assert parts == [("part-2",)]
    replay = await post(api, world, "fresh-key")  # a key within its period still replays
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.json() == fresh_key.json()


async def test_opt_out_history_is_kept_unless_configured_and_the_deciding_row_always(
    session_factory: SessionFactory, world: World
) -> None:
    # An old opt-out then an old opt-in of the same number, and an old lone opt-out.
    await execute(
        session_factory,
        "INSERT INTO opt_outs (phone, action, source, created_at) VALUES "
        "(:a, 'opt_out', 'api', :older), (:a, 'opt_in', 'api', :old), "
        "(:b, 'opt_out', 'api', :old)",
        a=number(1),
        b=number(2),
        older=days_ago(400),
        old=days_ago(300),
    )

    kept = await prune(session_factory, RetentionSettings(), 24)
    configured = await prune(session_factory, RetentionSettings(opt_out_history_days=180), 24)

    assert "opt_out_history" not in kept
    assert configured["opt_out_history"] == 1  # only the superseded opt-out
    rows = await execute(session_factory, "SELECT phone, action FROM opt_outs ORDER BY phone")
    assert rows == [(number(1), "opt_in"), (number(2), "opt_out")]


async def test_the_worker_runs_retention_as_a_cron_job(
    session_factory: SessionFactory, world: World
) -> None:
    await aged_message(session_factory, world, 1, 100, "delivered")
    settings = make_settings()

    pruned = await retention({"settings": settings, "session_factory": session_factory})

    assert pruned == 2  # the body and the old event
    assert "retention" in {job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs}


async def test_idle_endpoints_behind_busy_ones_are_pruned_and_busy_ones_not_locked(
    session_factory: SessionFactory, world: World
) -> None:
    """The idle-endpoint query once compared each event with itself: it locked endpoints that
    events still use, deleted nothing, and with busy endpoints first never reached idle ones."""
    ids = await seed_events(session_factory, world)
    await execute(  # make "busy" the oldest, so a batch of one meets it first
        session_factory,
        "UPDATE webhook_endpoints SET updated_at = :at WHERE id = :busy",
        at=days_ago(90),
        busy=ids["busy"],
    )
    await execute(
        session_factory,
        "UPDATE webhook_events SET status = 'delivered', created_at = :at WHERE id = :old",
        at=days_ago(5),
        old=ids["old_pending"],
    )  # the busy endpoint's event is recent and delivered: it stays, and so must its endpoint

    pruned = await prune(session_factory, RetentionSettings(batch_size=1), 24)

    endpoints = {
        row[0] for row in await execute(session_factory, "SELECT id FROM webhook_endpoints")
    }
    assert ids["idle"] not in endpoints
    assert {ids["busy"], ids["default"]} <= endpoints
    assert pruned["webhook_endpoints"] == 1


async def test_a_run_while_another_holds_the_run_lock_prunes_nothing(
    session_factory: SessionFactory, world: World
) -> None:
    """Two workers' runs must not fight over the same rows: the second one leaves at once."""
    from app.db import retention as module

    ids = await seed_events(session_factory, world)
    async with session_factory() as other:
        connection = await other.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        assert await connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": module._RUN_LOCK}
        )
        try:
            skipped = await prune(session_factory, RetentionSettings(), 24)
        finally:
            await connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": module._RUN_LOCK}
            )
    ran = await prune(session_factory, RetentionSettings(), 24)

    assert skipped == {}
    assert ran["webhook_events"] == 2
    remaining = {row[0] for row in await execute(session_factory, "SELECT id FROM webhook_events")}
    assert ids["old_delivered"] not in remaining


async def test_ended_console_sessions_are_deleted(
    session_factory: SessionFactory, world: World
) -> None:
    for name, ends in (("ended", days_ago(0.01)), ("open", NOW + timedelta(hours=1))):
        await execute(
            session_factory,
            "INSERT INTO console_sessions (token_hash, api_key_id, csrf_token, expires_at) "
            "SELECT sha256(convert_to(:name, 'UTF8')), id, 'csrf', :ends "
            "FROM api_keys WHERE is_admin",
            name=name,
            ends=ends,
        )

    pruned = await prune(session_factory, RetentionSettings(), 24)

    assert pruned["console_sessions"] == 1
    left = await execute(session_factory, "SELECT expires_at > now() FROM console_sessions")
    assert left == [(True,)]
