"""Alembic migrations: head matches the models, and every revision downgrades and upgrades."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.db.migrations import ROOT, migrate
from app.db.models import Base
from tests.conftest import ADMIN_DATABASE_URL

# The tables of the send path, written out so that losing one from the models and the
# migrations together still fails here.
SEND_PATH_TABLES = {
    "clients",
    "api_keys",
    "senders",
    "messages",
    "message_events",
    "opt_outs",
    "idempotency_keys",
}


def alembic_config(url: str) -> Config:
    """An Alembic config like `app.db.migrations.migrate` builds, aimed at `url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    return config


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_diff(engine: AsyncEngine) -> list[Any]:
    """What autogenerate would add to a new migration: empty when models and schema agree."""
    async with engine.connect() as connection:
        return await connection.run_sync(_diff)


async def public_relations(engine: AsyncEngine) -> dict[str, set[str]]:
    """Tables, sequences and indexes in the public schema, by kind."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT c.relkind::text, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'i')"
            )
        )
        kinds = {"r": "tables", "S": "sequences", "i": "indexes"}
        result: dict[str, set[str]] = {"tables": set(), "sequences": set(), "indexes": set()}
        for relkind, name in rows:
            result[kinds[relkind]].add(name)
        return result


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current_revision)


@pytest.fixture
async def scratch_database() -> AsyncIterator[str]:
    """An empty database of its own, dropped afterwards (the shared test database is left alone)."""
    name = f"smsgate_migrations_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        # make_url: a unix-socket URL (embedded PostgreSQL) ends in `?host=/socket/dir`.
        yield make_url(ADMIN_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def test_the_migrated_schema_matches_the_models(engine: AsyncEngine) -> None:
    diff = await schema_diff(engine)

    assert diff == []
    relations = await public_relations(engine)
    assert relations["tables"] == set(Base.metadata.tables) | {"alembic_version"}
    assert relations["tables"] >= SEND_PATH_TABLES
    head = ScriptDirectory.from_config(alembic_config("unused")).get_current_head()
    assert head is not None
    assert await current_revision(engine) == head


async def test_migrations_downgrade_to_base_and_upgrade_again(scratch_database: str) -> None:
    url = scratch_database
    config = alembic_config(url)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    # Oldest first; "base" stands for the empty schema before the first revision.
    revisions = [revision.revision for revision in reversed(list(script.walk_revisions()))]
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(migrate, url)
        assert await current_revision(engine) == head
        assert await schema_diff(engine) == []
        migrated = await public_relations(engine)

        await asyncio.to_thread(command.downgrade, config, "base")

        assert await current_revision(engine) is None
        # Nothing is left behind but Alembic's own bookkeeping.
        assert await public_relations(engine) == {
            "tables": {"alembic_version"},
            "sequences": set(),
            "indexes": {"alembic_version_pkc"},
        }

        # Each revision, one at a time, upgrades, downgrades and upgrades again ("stairway").
        for revision in revisions:
            await asyncio.to_thread(command.upgrade, config, revision)
            assert await current_revision(engine) == revision
            await asyncio.to_thread(command.downgrade, config, "-1")
            await asyncio.to_thread(command.upgrade, config, revision)
            assert await current_revision(engine) == revision

        assert await current_revision(engine) == head
        assert await schema_diff(engine) == []
        assert await public_relations(engine) == migrated
        assert migrated["tables"] >= SEND_PATH_TABLES
        # Upgrading an up-to-date database is a no-op.
        await asyncio.to_thread(migrate, url)
        assert await public_relations(engine) == migrated
    finally:
        await engine.dispose()


async def test_existing_senders_are_granted_to_the_clients_that_used_them(
    scratch_database: str,
) -> None:
    url = scratch_database
    config = alembic_config(url)
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(command.upgrade, config, "1c66deacd215")
        senders = {name: uuid.uuid4() for name in ("used", "default", "unused")}
        clients = {name: uuid.uuid4() for name in ("alpha", "beta", "idle")}
        async with engine.begin() as connection:
            for name, sender_id in senders.items():
                await connection.execute(
                    text(
                        "INSERT INTO senders (id, address, kind, provider, keywords, "
                        "rate_per_second) VALUES (:id, :address, 'alphanumeric', 'fake', "
                        "'{}'::jsonb, 1)"
                    ),
                    {"id": sender_id, "address": name.upper()},
                )
            for name, client_id in clients.items():
                await connection.execute(
                    text("INSERT INTO clients (id, name, default_sender_id) VALUES (:id, :n, :d)"),
                    {
                        "id": client_id,
                        "n": name,
                        "d": senders["default"] if name == "beta" else None,
                    },
                )
            for client in ("alpha", "beta", "alpha"):  # alpha twice: one grant
                await connection.execute(
                    text(
                        'INSERT INTO messages (id, client_id, sender_id, "to", "from", body, '
                        "encoding, segments, status, provider) VALUES (:id, :client, :sender, "
                        "'+14155550123', 'USED', 'Hi', 'gsm7', 1, 'queued', 'fake')"
                    ),
                    {"id": uuid.uuid4(), "client": clients[client], "sender": senders["used"]},
                )

        await asyncio.to_thread(command.upgrade, config, "head")

        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT sender_id, client_id FROM sender_clients"))
            grants = {(sender_id, client_id) for sender_id, client_id in rows}
        assert grants == {
            (senders["used"], clients["alpha"]),
            (senders["used"], clients["beta"]),
            (senders["default"], clients["beta"]),
        }
    finally:
        await engine.dispose()


async def test_a_downgrade_past_key_expiry_revokes_the_keys_that_expire(
    scratch_database: str,
) -> None:
    """Before expiry existed a key worked unless revoked: a downgrade must not bring a key that
    expired (or whose rotation overlap ended) back to life."""
    url = scratch_database
    config = alembic_config(url)
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(command.upgrade, config, "sender_grants_key_lifecycle")
        async with engine.begin() as connection:
            client_id = uuid.uuid4()
            await connection.execute(
                text("INSERT INTO clients (id, name) VALUES (:id, 'alpha')"), {"id": client_id}
            )
            for prefix, expires in (("sk_gone", "now() - interval '1 day'"), ("sk_kept", "NULL")):
                await connection.execute(
                    text(
                        "INSERT INTO api_keys (id, client_id, key_hash, prefix, expires_at) "
                        f"VALUES (:id, :client, :hash, :prefix, {expires})"
                    ),
                    {
                        "id": uuid.uuid4(),
                        "client": client_id,
                        "hash": prefix.encode().ljust(32, b"\0"),
                        "prefix": prefix,
                    },
                )

        await asyncio.to_thread(command.downgrade, config, "1c66deacd215")

        async with engine.connect() as connection:
            working = await connection.scalars(
                text("SELECT prefix FROM api_keys WHERE revoked_at IS NULL")
            )
            assert list(working) == ["sk_kept"]
    finally:
        await engine.dispose()


async def check_constraints(engine: AsyncEngine, table: str) -> dict[str, str]:
    """The CHECK constraints of a table, by name, as PostgreSQL prints them."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = CAST(:table AS regclass) AND contype = 'c'"
            ),
            {"table": table},
        )
        return {str(name): str(definition) for name, definition in rows}


async def test_provider_names_are_not_listed_in_the_schema(engine: AsyncEngine) -> None:
    """Providers come from the registry: no constraint names them, so a new one needs no
    migration; a fallback equal to the provider is still refused by the database."""
    checks = await check_constraints(engine, "senders")

    assert "ck_senders_provider" not in checks
    assert checks["ck_senders_fallback_provider"] == (
        "CHECK (((fallback_provider)::text <> (provider)::text))"
    )
    assert not any("twilio" in definition for definition in checks.values())


async def test_a_downgrade_past_scheduled_and_held_cancels_those_messages(
    scratch_database: str,
) -> None:
    """Older code knows neither `scheduled` nor `held`: a downgrade must not strand them."""
    url = scratch_database
    config = alembic_config(url)
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(command.upgrade, config, "head")
        sender_id, client_id = uuid.uuid4(), uuid.uuid4()
        statuses = {"scheduled": uuid.uuid4(), "held": uuid.uuid4(), "queued": uuid.uuid4()}
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO senders (id, address, kind, provider, keywords, rate_per_second) "
                    "VALUES (:id, 'ACME', 'alphanumeric', 'fake', '{}'::jsonb, 1)"
                ),
                {"id": sender_id},
            )
            await connection.execute(
                text("INSERT INTO clients (id, name) VALUES (:id, 'alpha')"), {"id": client_id}
            )
            for status, message_id in statuses.items():
                await connection.execute(
                    text(
                        'INSERT INTO messages (id, client_id, sender_id, "to", "from", body, '
                        "encoding, segments, status, provider) VALUES (:id, :client, :sender, "
                        "'+14155550123', 'ACME', 'Hi', 'gsm7', 1, :status, 'fake')"
                    ),
                    {"id": message_id, "client": client_id, "sender": sender_id, "status": status},
                )

        await asyncio.to_thread(command.downgrade, config, "client_traffic")

        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT id, status, error_code FROM messages"))
            after = {message_id: (status, code) for message_id, status, code in rows}
        assert after == {
            statuses["scheduled"]: ("canceled", "canceled"),
            statuses["held"]: ("canceled", "canceled"),
            statuses["queued"]: ("queued", None),
        }
    finally:
        await engine.dispose()
