"""Shared fixtures: a real PostgreSQL database built by Alembic, a real Redis, the app over ASGI.

Each test starts from empty tables (TRUNCATE) and an empty Redis database, because the code under
test commits its own transactions (the API per request, the worker per step).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, SecretStr
from redis.asyncio import Redis
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.access.auth import create_api_key
from app.db.migrations import migrate
from app.db.models import Base, Client, Sender, SenderClient
from app.db.session import SessionFactory, create_engine, create_session_factory
from app.kernel.secrets import Keyring, install
from app.kernel.settings import Settings
from app.main import create_app
from app.providers.fake import FakeProviderSettings
from app.providers.registry import PROVIDERS
from app.providers.twilio import TwilioSettings
from app.providers.vonage import VonageSettings
from app.senders.keywords import KeywordConfig
from tests.netguard import NetworkGuard

ADMIN_DATABASE_URL = os.environ.get(
    "TEST_ADMIN_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TEST_DATABASE = os.environ.get("TEST_DATABASE_NAME", "smsgate_test")
# The fault-injection suite starts its own servers and takes minutes: `./scripts/test-faults`
# (FAULT_SUITE=1) runs it; an ordinary run does not collect it.
collect_ignore = [] if os.environ.get("FAULT_SUITE") == "1" else ["faults"]

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "twilio-test-auth-token"
VONAGE_SIGNATURE_SECRET = "vonage-test-signature-secret"
PUBLIC_BASE_URL = "https://sms.example.test"
METRICS_TOKEN = "test-metrics-token"
# 32 bytes, base64: the key signing secrets are encrypted with in the tests' database.
SECRETS_KEY = "dGVzdC1zZWNyZXRzLWtleS0zMi1ieXRlcy1sb25nISE="


def owned_database_url() -> str:
    """The URL of the database the tests own (dropped and rebuilt per run)."""
    # make_url, not string surgery: a unix-socket URL ends in `?host=/path/to/socket/dir`.
    url = make_url(ADMIN_DATABASE_URL).set(database=TEST_DATABASE)
    return url.render_as_string(hide_password=False)


def make_settings(**overrides: Any) -> Settings:
    """Settings pointing at the test database and Redis, with test provider credentials
    (a provider's group, `twilio=TwilioSettings(...)`, may be overridden like any field)."""
    sections: dict[str, BaseModel] = {
        "twilio": TwilioSettings(account_sid=TWILIO_SID, auth_token=SecretStr(TWILIO_TOKEN)),
        "vonage": VonageSettings(
            api_key="vonage01",  # exactly 8 characters, as Vonage's API description wants
            api_secret=SecretStr("vonage-secret"),
            signature_secret=SecretStr(VONAGE_SIGNATURE_SECRET),
            signature_method="sha256",
        ),
        "fake": FakeProviderSettings(delivery_delay_seconds=0.0),
    }
    for name in list(overrides):
        if isinstance(overrides[name], BaseModel) and PROVIDERS.get(name) is not None:
            sections[name] = overrides.pop(name)
    values: dict[str, Any] = {
        "database_url": owned_database_url(),
        "redis_url": TEST_REDIS_URL,
        "public_base_url": PUBLIC_BASE_URL,
        "retry_base_delay_seconds": 0.01,
        "worker_metrics_port": 0,
        "events_worker_metrics_port": 0,
        "retry_max_delay_seconds": 0.05,
        # Every test builds its own app: a few connections each, not production's 32.
        "db_pool_size": 4,
        "metrics_token": METRICS_TOKEN,
        "secrets_key": SECRETS_KEY,
    }
    values.update(overrides)
    return Settings(**values).with_sections(**sections)


# NETWORK_GUARD=1 puts every test under the guard; otherwise the tests marked `network_guard`.
GUARD_EVERY_TEST = os.environ.get("NETWORK_GUARD") == "1"


@pytest.fixture
def network_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkGuard]:
    """Notes every network call the service makes inside an open transaction of the same
    task; the test fails at its end if there was one (tests/netguard.py)."""
    guard = NetworkGuard()
    with guard.installed(monkeypatch):
        yield guard
    assert guard.violations == [], "\n\n".join(guard.violations[:3])


@pytest.fixture(autouse=True)
def _guarded(request: pytest.FixtureRequest) -> None:
    """The guard for tests marked `network_guard` (every test with NETWORK_GUARD=1)."""
    if GUARD_EVERY_TEST or request.node.get_closest_marker("network_guard") is not None:
        request.getfixturevalue("network_guard")


@pytest.fixture(scope="session", autouse=True)
def secrets_keyring() -> Iterator[None]:
    """The keyring every process installs at start-up, for tests that call domain code directly
    (apps and workers built by the tests install the same one)."""
    install(Keyring.from_settings(make_settings()))
    yield
    install(None)


@pytest.fixture(scope="session")
async def database() -> AsyncIterator[str]:
    """A fresh database migrated to head with Alembic, as production would be."""
    admin = create_async_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)'))
        await connection.execute(text(f'CREATE DATABASE "{TEST_DATABASE}"'))
    await admin.dispose()
    url = owned_database_url()
    await asyncio.to_thread(migrate, url)  # Alembic runs its own event loop
    yield url


@pytest.fixture(scope="session")
async def engine(database: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database for the tests' own queries."""
    engine = create_engine(database, pool_size=5)
    yield engine
    await engine.dispose()


@pytest.fixture
async def session_factory(engine: AsyncEngine) -> AsyncIterator[SessionFactory]:
    """Sessions on emptied tables."""
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield create_session_factory(engine)


@pytest.fixture
async def session(session_factory: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session for arranging and inspecting data; commit explicitly."""
    async with session_factory() as session:
        yield session


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """The test Redis database, emptied."""
    client = Redis.from_url(TEST_REDIS_URL)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    """Test settings."""
    return make_settings()


REPLIES = {
    "opt_out": {
        "en": "Unsubscribed from ACME. Reply START to resubscribe.",
        "fr": "Désabonné d'ACME. Répondez START pour vous réabonner.",
    },
    "opt_in": {
        "en": "Resubscribed to ACME. Reply STOP to stop.",
        "fr": "Réabonné à ACME. Répondez ARRET pour arrêter.",
    },
    "help": {
        "en": "ACME orders: reply STOP to stop. Msg&data rates may apply.",
        "fr": "Commandes ACME : répondez ARRET pour arrêter.",
    },
}


def ready_keywords(**changes: Any) -> dict[str, Any]:
    """The built-in keyword sets with every reply configured (so the sender may send), as JSON."""
    config = KeywordConfig().model_dump(mode="json")
    for category, replies in REPLIES.items():
        config[category]["replies"] = dict(replies)
    config.update(changes)
    return config


@dataclass
class World:
    """Senders and keys every API test can use."""

    twilio_sender: Sender
    vonage_sender: Sender
    fake_sender: Sender
    client_key: str
    other_client_key: str
    admin_key: str
    client_id: uuid.UUID

    def auth(self, key: str | None = None) -> dict[str, str]:
        """Headers authenticating as the client (or with `key`)."""
        return {"Authorization": f"Bearer {key or self.client_key}"}


@pytest.fixture
async def world(session_factory: SessionFactory) -> World:
    """Three senders (one per provider) and keys for two clients and an admin."""
    async with session_factory.begin() as session:
        senders = [
            Sender(id=uuid.uuid4(), address="+14155550100", kind="long_code", provider="twilio"),
            Sender(id=uuid.uuid4(), address="ACME", kind="alphanumeric", provider="vonage"),
            Sender(id=uuid.uuid4(), address="+14155550199", kind="long_code", provider="fake"),
        ]
        for sender in senders:
            sender.keywords = ready_keywords()
            # Fast enough that no test waits for its sender's pace unless it sets a rate itself.
            sender.rate_per_second = 1000.0
        session.add_all(senders)
        await session.flush()
        client_key = await create_api_key(session, "shop")
        other_key = await create_api_key(session, "other-shop")
        admin_key = await create_api_key(session, "operator", is_admin=True)
        client = (await session.execute(text("SELECT id FROM clients WHERE name = 'shop'"))).one()
        shop = await session.get(Client, client[0])
        assert shop is not None
        shop.default_sender_id = senders[0].id
        # Both clients may send from every sender here; tests/api/test_isolation.py has
        # clients with senders of their own.
        client_ids = list(
            await session.scalars(select(Client.id).where(Client.name.in_(["shop", "other-shop"])))
        )
        session.add_all(
            SenderClient(sender_id=sender.id, client_id=client_id)
            for sender in senders
            for client_id in client_ids
        )
    return World(senders[0], senders[1], senders[2], client_key, other_key, admin_key, shop.id)


@pytest.fixture
def app_factory(database: str, redis: Redis) -> Iterator[Callable[..., Any]]:
    """Builds the app with given setting overrides; used as `async with app_factory() as client`."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def build(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(make_settings(**overrides))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_BASE_URL) as client:
                yield client

    yield build


@pytest.fixture
async def api(
    app_factory: Callable[..., Any], session_factory: SessionFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process, on emptied tables and Redis."""
    async with app_factory() as client:
        yield client
