"""The one accept pipeline: rows shared by single and batch sends, its SQL cost, the cached
lookups of keys and senders, idempotency's race guard, and what it does without a database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from app.access.auth import hash_key
from app.db.models import ApiKey, IdempotencyKey, Message, MessageEvent, Sender
from app.db.pg import APPLICATION_NAME, Database
from app.db.session import SessionFactory
from app.kernel.metrics import DB_STATEMENTS, DB_TRANSACTIONS
from app.kernel.settings import PumpingSettings
from app.sending import accept
from app.sending.accept import _insert, message_row
from app.sending.encoding import analyze_body
from tests.api.test_send import assert_problem, send
from tests.conftest import World, owned_database_url

MESSAGE = {
    "to": "+14155550123",
    "body": "Your order #1042 has shipped.",
    "from": "+14155550199",
    "callback_url": "https://hooks.example.com/sms",
    "validity_period": 600,
    "metadata": {"order": "1042"},
}
# Set by the database or the request, so different for any two messages.
PER_MESSAGE = {"id", "created_at", "updated_at", "next_attempt_at", "expires_at"}


def statements() -> float:
    return float(DB_STATEMENTS._value.get())


def commits() -> float:
    return float(DB_TRANSACTIONS.labels(outcome="commit")._value.get())


@pytest.fixture(autouse=True)
def public_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """hooks.example.com resolves to a public address without asking a resolver."""

    async def accept_url(url: str, *_: Any, **__: Any) -> None:
        return None

    monkeypatch.setattr(accept, "check_destination", accept_url)


async def stored_rows(session_factory: SessionFactory) -> list[dict[str, Any]]:
    async with session_factory() as session:
        messages = (await session.scalars(select(Message).order_by(Message.created_at))).all()
        return [
            {column.key: getattr(message, column.key) for column in Message.__mapper__.column_attrs}
            for message in messages
        ]


async def test_a_single_send_and_a_batch_of_one_store_the_same_rows(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    single = await api.post("/v1/messages", json=MESSAGE, headers=world.auth())
    batch = await api.post("/v1/messages/batch", json={"messages": [MESSAGE]}, headers=world.auth())

    assert single.status_code == 202, single.text
    assert batch.status_code == 200, batch.text
    answered = batch.json()["data"][0]["message"]
    assert {k: v for k, v in answered.items() if k not in PER_MESSAGE} == {
        k: v for k, v in single.json().items() if k not in PER_MESSAGE
    }
    first, second = await stored_rows(session_factory)
    assert {k: v for k, v in first.items() if k not in PER_MESSAGE} == {
        k: v for k, v in second.items() if k not in PER_MESSAGE
    }
    assert first["metadata_"] == {"order": "1042"} and first["kind"] == "regular"
    async with session_factory() as session:
        events = (await session.execute(select(MessageEvent.status, MessageEvent.source))).all()
    assert sorted(events) == [("queued", "api"), ("queued", "api")]


async def test_every_column_of_a_row_is_one_the_messages_table_has() -> None:
    row = message_row(
        client_id=None,
        sender_id=uuid.uuid4(),
        from_="ACME",
        provider="fake",
        to="+14155550123",
        body="hi",
        analysis=analyze_body("hi"),
        now=datetime.now(UTC),
    )

    assert set(row) <= {column.name for column in Message.__table__.c}


async def test_a_single_send_without_a_key_is_one_statement_and_one_transaction(
    api: httpx.AsyncClient, world: World
) -> None:
    assert (await send(api, world)).status_code == 202  # the key and sender are now cached
    before = statements(), commits()

    response = await send(api, world)

    assert response.status_code == 202, response.text
    assert (statements() - before[0], commits() - before[1]) == (1, 1)


async def test_a_single_send_with_a_key_is_two_statements_in_one_transaction(
    api: httpx.AsyncClient, world: World
) -> None:
    assert (await send(api, world, **{"from": MESSAGE["from"]})).status_code == 202  # cached
    before = statements(), commits()

    response = await api.post(
        "/v1/messages", json=MESSAGE, headers={**world.auth(), "Idempotency-Key": "two"}
    )

    assert response.status_code == 202, response.text
    assert (statements() - before[0], commits() - before[1]) == (2, 1)


async def test_a_batch_is_one_statement_whatever_its_size(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    # The pumping alarm off: 250 numbers of one range would raise it, and its event is a
    # statement of its own (once per client, range and window).
    async with app_factory(pumping=PumpingSettings(action="off")) as api:
        await _one_statement_for_a_batch(api, world, session_factory)


async def _one_statement_for_a_batch(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await send(api, world, **{"from": MESSAGE["from"]})).status_code == 202  # cached
    before = statements()
    messages = [{**MESSAGE, "to": f"+1415555{n:04d}"} for n in range(200, 450)]

    response = await api.post(
        "/v1/messages/batch", json={"messages": messages}, headers=world.auth()
    )

    assert response.json()["accepted"] == 250
    assert statements() - before == 1
    assert len(await stored_rows(session_factory)) == 251


@asynccontextmanager
async def cached_app(app_factory: Any, seconds: float) -> AsyncIterator[httpx.AsyncClient]:
    async with app_factory(lookup_cache_seconds=seconds) as api:
        yield api


async def test_a_revoked_key_works_until_the_cache_expires(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with cached_app(app_factory, 0.5) as api:
        assert (await send(api, world)).status_code == 202
        async with session_factory.begin() as session:  # revoked by another process
            await session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(world.client_key))
                .values(revoked_at=datetime.now(UTC))
            )

        honoured = await send(api, world)
        await asyncio.sleep(0.6)
        refused = await send(api, world)

    assert honoured.status_code == 202
    assert_problem(refused, 401, "invalid_api_key")


async def test_a_revocation_made_in_the_process_takes_effect_at_once(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with cached_app(app_factory, 60) as api:
        assert (await send(api, world)).status_code == 202
        async with session_factory.begin() as session:
            await session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(world.client_key))
                .values(revoked_at=datetime.now(UTC))
            )
        app = api._transport.app  # type: ignore[attr-defined]
        app.state.lookups.forget_principals()

        refused = await send(api, world)

    assert_problem(refused, 401, "invalid_api_key")


async def test_without_a_cache_a_revocation_takes_effect_at_once(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with cached_app(app_factory, 0) as api:
        assert (await send(api, world)).status_code == 202
        async with session_factory.begin() as session:
            await session.execute(update(ApiKey).values(revoked_at=datetime.now(UTC)))

        refused = await send(api, world)

    assert_problem(refused, 401, "invalid_api_key")


def incomplete_keywords(sender: Sender) -> dict[str, Any]:
    return {**sender.keywords, "help": {**sender.keywords["help"], "replies": {}}}


async def test_a_sender_changed_through_the_api_is_used_at_once(
    app_factory: Any, world: World
) -> None:
    async with cached_app(app_factory, 60) as api:
        assert (await send(api, world, **{"from": "+14155550199"})).status_code == 202
        patched = await api.patch(
            f"/v1/senders/{world.fake_sender.id}",
            json={"keywords": incomplete_keywords(world.fake_sender)},
            headers=world.auth(world.admin_key),
        )
        assert patched.status_code == 200, patched.text

        refused = await send(api, world, **{"from": "+14155550199"})

    assert_problem(refused, 403, "sender_keywords_incomplete")


async def test_a_sender_changed_elsewhere_is_used_once_the_cache_expires(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with cached_app(app_factory, 0.5) as api:
        first = await send(api, world)  # the client's default sender: looked up by id
        async with session_factory.begin() as session:
            await session.execute(
                update(Sender).where(Sender.id == world.twilio_sender.id).values(provider="vonage")
            )

        cached = await send(api, world)
        await asyncio.sleep(0.6)
        fresh = await send(api, world)

    assert first.json()["provider"] == cached.json()["provider"] == "twilio"
    assert fresh.json()["provider"] == "vonage"


async def test_a_cached_sender_deleted_meanwhile_is_looked_up_again(
    app_factory: Any, world: World, session_factory: SessionFactory
) -> None:
    async with cached_app(app_factory, 60) as api:
        assert (await send(api, world, **{"from": "ACME"})).status_code == 202
        async with session_factory.begin() as session:
            await session.execute(text("DELETE FROM message_events"))
            await session.execute(text("DELETE FROM messages"))
            await session.execute(text("DELETE FROM senders WHERE address = 'ACME'"))

        response = await send(api, world, **{"from": "ACME"})

    assert_problem(response, 422, "unknown_sender", field="from")


async def test_the_idempotency_guard_stores_nothing_over_a_live_key(
    world: World, session_factory: SessionFactory
) -> None:
    # The first request committed after the second's first statement read the key: the second's
    # INSERT must store neither its messages nor its response.
    async with session_factory.begin() as session:
        session.add(
            IdempotencyKey(
                client_id=world.client_id,
                key="raced",
                request_hash=b"\x01" * 32,
                response_status=202,
                response_body={"id": "first"},
            )
        )
    row = message_row(
        client_id=world.client_id,
        sender_id=world.fake_sender.id,
        from_=world.fake_sender.address,
        provider="fake",
        to="+14155550123",
        body="hi",
        analysis=analyze_body("hi"),
        now=datetime.now(UTC),
    )
    db = Database(owned_database_url(), size=1)
    try:
        async with db.transaction() as connection:
            stored = await _insert(
                connection, [row], key_row=(world.client_id, "raced", b"\x02" * 32, 202, {}, 24)
            )
    finally:
        await db.close()

    assert stored == 0
    assert await stored_rows(session_factory) == []
    async with session_factory() as session:
        kept = await session.get(IdempotencyKey, (world.client_id, "raced"))
    assert kept is not None and kept.response_body == {"id": "first"}


async def test_callback_urls_are_resolved_before_any_connection_is_taken(
    api: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = 0
    seen: list[int] = []
    connection = Database.connection

    @asynccontextmanager
    async def counted(self: Database) -> AsyncIterator[Any]:
        nonlocal held
        async with connection(self) as opened:
            held += 1
            try:
                yield opened
            finally:
                held -= 1

    async def slow_dns(url: str, *_: Any, **__: Any) -> None:
        await asyncio.sleep(0.01)
        seen.append(held)

    monkeypatch.setattr(Database, "connection", counted)
    monkeypatch.setattr(accept, "check_destination", slow_dns)

    single = await api.post("/v1/messages", json=MESSAGE, headers=world.auth())
    keyed = await api.post(
        "/v1/messages", json=MESSAGE, headers={**world.auth(), "Idempotency-Key": "dns"}
    )
    batch = await api.post("/v1/messages/batch", json={"messages": [MESSAGE]}, headers=world.auth())

    assert (single.status_code, keyed.status_code, batch.status_code) == (202, 202, 200)
    assert seen == [0, 0, 0]


@pytest.mark.parametrize("settle", [0.0, 0.2])
async def test_a_connection_the_database_dropped_is_never_a_500_and_is_replaced(
    app_factory: Any, world: World, session_factory: SessionFactory, settle: float
) -> None:
    # As after a PostgreSQL restart: the send pool's connection is closed by the server, and
    # the next request comes before (0) or after (0.2 s) the client has noticed.
    async with app_factory(db_pool_size=1) as api:
        assert (await send(api, world)).status_code == 202
        async with session_factory() as session:
            await session.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = :name"),
                {"name": APPLICATION_NAME},
            )  # fmt: skip
        await asyncio.sleep(settle)
        lost = await send(api, world)
        again = await send(api, world)

    if lost.status_code != 202:
        assert_problem(lost, 503, "service_unavailable")
        assert lost.headers["retry-after"] == "5"
    assert again.status_code == 202, again.text


async def test_a_database_out_of_connections_answers_503_not_500(
    api: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLSTATE 53300 (too many connections) says the database is unavailable, not that the
    request was wrong: 503 with Retry-After, as for a database that is down."""
    import asyncpg

    async def too_many(*args: Any, **kwargs: Any) -> Any:
        raise asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")

    monkeypatch.setattr(accept, "fetch", too_many)
    response = await send(api, world)

    assert_problem(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "5"


async def test_a_lone_surrogate_with_an_idempotency_key_is_refused_not_a_500(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.post(
        "/v1/messages",
        content=b'{"to": "+14155550123", "body": "hi", "metadata": {"order": "\\ud800"}}',
        headers={
            **world.auth(),
            "Content-Type": "application/json",
            "Idempotency-Key": "surrogate-1",
        },
    )

    assert response.status_code == 422, response.text


async def test_the_send_pool_plans_its_statements_once(
    database: str, session_factory: SessionFactory
) -> None:
    """The send pool's sessions keep one generic plan per prepared statement: planning the
    accept statement anew for every send cost PostgreSQL about a third of its CPU per send.
    The engine's sessions (lists, sweeps) keep the server's default."""
    pool = Database(database, size=1)
    try:
        async with pool.connection() as connection:
            mode = await connection.fetchval("SHOW plan_cache_mode")
    finally:
        await pool.close()
    async with session_factory() as session:
        default = await session.scalar(text("SHOW plan_cache_mode"))
    assert (mode, default) == ("force_generic_plan", "auto")


async def test_returning_a_send_connection_costs_no_round_trip(database: str) -> None:
    """asyncpg's default reset sent four statements to PostgreSQL on every release (a round
    trip per request); the send path leaves no session state, so the pool sends nothing."""
    pool = Database(database, size=1)
    sent: list[str] = []
    try:
        async with pool.connection() as connection:
            connection.add_query_logger(lambda record: sent.append(record.query))
            await connection.fetchval("SELECT 1")
        async with pool.connection() as connection:
            await connection.fetchval("SELECT 2")
    finally:
        await pool.close()
    assert sent == ["SELECT 1", "SELECT 2"]


async def test_a_transaction_left_open_is_rolled_back_when_its_connection_returns(
    database: str,
) -> None:
    """Skipping the reset must not hand the next request a connection inside someone's
    transaction: a row written in a transaction nobody committed is gone."""
    pool = Database(database, size=1)
    try:
        async with pool.connection() as connection:
            await connection.execute("BEGIN")
            await connection.execute("CREATE TEMPORARY TABLE left_open (n int) ON COMMIT DROP")
        async with pool.connection() as connection:
            in_transaction = connection.is_in_transaction()
            exists = await connection.fetchval("SELECT to_regclass('pg_temp.left_open')")
    finally:
        await pool.close()
    assert (in_transaction, exists) == (False, None)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"send_at": datetime(2026, 12, 5, 9, 30, tzinfo=UTC), "status": "scheduled"},
        {"validity_period": 600, "callback_url": "https://hooks.example.com/sms"},
        {"body": "Ünïcode — “quotes” 🚀", "metadata": {"nested": {"a": [1, 2.5, None]}}},
    ],
)
def test_an_accepted_message_renders_as_message_out_does(extra: dict[str, Any]) -> None:
    """The send routes render accepted rows with MessageOut's validator and serializer called
    directly (`message_json`): the same JSON as the model's own methods, field for field."""
    from app.sending.accept import message_fields
    from app.sending.routes import message_json
    from app.sending.schemas import MessageOut

    row = message_row(
        send_at=None,
        client_id=uuid.uuid4(),
        sender_id=uuid.uuid4(),
        from_="+14155550199",
        provider="twilio",
        to="+14155550123",
        body=str(extra.get("body", "Your order #1042 has shipped.")),
        analysis=analyze_body(str(extra.get("body", "Your order #1042 has shipped."))),
        callback_url=extra.get("callback_url"),
        metadata=extra.get("metadata"),
        validity_period=extra.get("validity_period"),
        api="native",
        now=datetime.now(UTC),
    ) | {key: value for key, value in extra.items() if key in {"send_at", "status"}}
    fields = message_fields(row)

    expected = MessageOut.model_validate(fields).model_dump(mode="json", by_alias=True)
    assert message_json(fields) == expected
    assert expected["to"] == "+14155550123" and "from" in expected
