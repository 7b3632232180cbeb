"""Access and data protection: /metrics behind a token, worker metrics on loopback, signing
secrets encrypted at rest (a dump of the database alone cannot sign our webhooks)."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from app.db.session import SessionFactory
from app.kernel.metrics import serve_metrics
from app.kernel.secrets import Keyring, SecretsKeyError, generate_key, install, installed
from app.kernel.settings import Settings
from tests.api.test_send import assert_problem
from tests.conftest import (
    ADMIN_DATABASE_URL,
    METRICS_TOKEN,
    SECRETS_KEY,
    World,
    make_settings,
)
from tests.processes import clean_env, free_port, run_smsgate
from tests.test_migrations import alembic_config

# ---- Metrics ------------------------------------------------------------------------------


async def test_api_metrics_need_the_metrics_token(app_factory: Any, world: World) -> None:
    async with app_factory() as api:
        anonymous = await api.get("/metrics")
        api_key = await api.get("/metrics", headers=world.auth(world.admin_key))
        token = await api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})

    assert_problem(anonymous, 401, "invalid_metrics_token")
    assert_problem(api_key, 401, "invalid_metrics_token")  # an admin API key is not the token
    assert token.status_code == 200
    assert "smsgate_messages" in token.text


async def test_api_metrics_are_off_without_a_token(app_factory: Any) -> None:
    async with app_factory(metrics_token="") as api:
        response = await api.get("/metrics", headers={"Authorization": "Bearer "})

    assert_problem(response, 404, "not_found")


def _listening_address(port: int) -> str:
    """The local address of the socket listening on `port` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    raise AssertionError(f"nothing listens on {port}")


def test_worker_metrics_listen_on_loopback_by_default() -> None:
    port = free_port()
    assert Settings().metrics_host == "127.0.0.1"

    serve_metrics(port, Settings().metrics_host)

    assert _listening_address(port) == "127.0.0.1"
    assert "smsgate" in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text


# ---- Signing secrets at rest ----------------------------------------------------------------


async def test_signing_secrets_are_stored_encrypted_and_served_in_clear(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    served = (await api.get("/v1/signing-secrets", headers=world.auth())).json()
    (secret,) = [item["secret"] for item in served["data"]]
    async with session_factory() as session:
        (stored,) = (await session.execute(text("SELECT secret FROM signing_secrets"))).scalars()

    assert secret.startswith("whsec_")
    assert stored.startswith("aesgcm1$") and "whsec_" not in stored
    assert base64.b64decode(secret.removeprefix("whsec_")) not in base64.urlsafe_b64decode(
        stored.rsplit("$", 1)[1]
    )
    assert installed().decrypt(stored) == secret


def test_a_dump_cannot_be_read_without_the_key_nor_with_another() -> None:
    stored = Keyring.from_settings(make_settings()).encrypt("whsec_c2VjcmV0")
    other = Keyring(base64.b64decode(generate_key()))

    with pytest.raises(SecretsKeyError, match="neither SECRETS_KEY"):
        other.decrypt(stored)
    tampered = stored[:-4] + ("AAAA" if not stored.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretsKeyError):
        Keyring.from_settings(make_settings()).decrypt(tampered)
    with pytest.raises(SecretsKeyError, match="not encrypted"):
        other.decrypt("whsec_c2VjcmV0")  # a plain secret slipped into the table is refused


def test_without_a_key_the_api_does_not_start() -> None:
    with pytest.raises(SecretsKeyError, match="SECRETS_KEY is not set"):
        Keyring.from_settings(make_settings(secrets_key=""))
    with pytest.raises(SecretsKeyError, match="32 bytes"):
        Keyring.from_settings(make_settings(secrets_key=base64.b64encode(b"short").decode()))


MIGRATION_DATABASE = "smsgate_test_h12b_secrets"


@pytest.fixture
async def scratch_database() -> Any:
    """A database of its own, for migrating up and down with rows in it."""
    from sqlalchemy.engine import make_url

    admin = create_async_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    name = MIGRATION_DATABASE
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


async def test_the_migration_encrypts_existing_secrets_and_rotation_reencrypts_them(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = alembic_config(scratch_database)
    before_encryption = "message_parts"
    await asyncio.to_thread(command.upgrade, config, before_encryption)
    # A connection per statement: the schema changes under it between them.
    engine = create_async_engine(scratch_database, poolclass=NullPool)
    async with engine.begin() as connection:
        client = await connection.scalar(
            text("INSERT INTO clients (id, name) VALUES (gen_random_uuid(), 'c') RETURNING id")
        )
        await connection.execute(
            text("INSERT INTO signing_secrets (client_id, secret) VALUES (:c, 'whsec_b2xk')"),
            {"c": client},
        )

    monkeypatch.setenv("SECRETS_KEY", SECRETS_KEY)
    await asyncio.to_thread(command.upgrade, config, "head")
    async with engine.connect() as connection:
        migrated = await connection.scalar(text("SELECT secret FROM signing_secrets"))
    assert migrated.startswith("aesgcm1$")
    assert Keyring.from_settings(make_settings()).decrypt(migrated) == "whsec_b2xk"
    # A Twilio auth token (written as the API writes it: encrypted) is rotated too.
    token = Keyring.from_settings(make_settings()).encrypt("0123456789abcdef0123456789abcdef")
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO twilio_credentials (client_id, auth_token) VALUES (:c, :t)"),
            {"c": client, "t": token},
        )

    # Rotation: a new key, the old one kept for reading, then every row rewritten.
    new_key = generate_key()
    env = clean_env(
        DATABASE_URL=scratch_database, SECRETS_KEY=new_key, SECRETS_PREVIOUS_KEYS=SECRETS_KEY
    )
    result = await asyncio.to_thread(run_smsgate, "reencrypt-secrets", env=env)
    assert result.returncode == 0, result.stderr
    assert "2 of 2 secrets re-encrypted" in result.stdout
    async with engine.connect() as connection:
        rotated = await connection.scalar(text("SELECT secret FROM signing_secrets"))
        rotated_token = await connection.scalar(text("SELECT auth_token FROM twilio_credentials"))
    new_only = Keyring(base64.b64decode(new_key))
    assert new_only.is_current(rotated)
    assert new_only.decrypt(rotated) == "whsec_b2xk"
    assert new_only.decrypt(rotated_token) == "0123456789abcdef0123456789abcdef"

    monkeypatch.setenv("SECRETS_KEY", new_key)
    await asyncio.to_thread(command.downgrade, config, before_encryption)
    async with engine.connect() as connection:
        restored = await connection.scalar(text("SELECT secret FROM signing_secrets"))
    await engine.dispose()
    assert restored == "whsec_b2xk"


def test_restore_the_tests_keyring() -> None:
    # The migration above ran in this process; the tests' keyring is still the one installed.
    install(Keyring.from_settings(make_settings()))
    assert installed().current_id == Keyring.from_settings(make_settings()).current_id
