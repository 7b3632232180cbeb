"""The `smsgate` command, run as a subprocess against the test database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.db.models import ApiKey, Client, Sender
from app.db.session import SessionFactory
from app.domain.auth import hash_key
from tests.conftest import REPLIES, World, owned_database_url, ready_keywords

ROOT = Path(__file__).resolve().parent.parent


async def smsgate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": owned_database_url()}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_json(tmp_path: Path, value: Any) -> str:
    path = tmp_path / "senders.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


async def test_seed_senders_creates_then_updates(
    tmp_path: Path, world: World, session_factory: SessionFactory
) -> None:
    first = write_json(
        tmp_path,
        [
            {
                "address": "(415) 555-0142",
                "kind": "long_code",
                "provider": "twilio",
                "keywords": ready_keywords(),
            },
            {"address": "SHOP", "kind": "alphanumeric", "provider": "vonage"},
        ],
    )
    created = await smsgate("seed-senders", first)

    assert created.returncode == 0, created.stderr
    assert created.stdout == "2 senders created, 0 updated\n"

    second = write_json(
        tmp_path,
        [
            {
                "address": "+14155550142",
                "kind": "long_code",
                "provider": "vonage",
                "keywords": ready_keywords(),
            },
        ],
    )
    updated = await smsgate("seed-senders", second)

    assert updated.stdout == "0 senders created, 1 updated\n", updated.stderr
    async with session_factory() as session:
        sender = await session.scalar(select(Sender).where(Sender.address == "+14155550142"))
        shop = await session.scalar(select(Sender).where(Sender.address == "SHOP"))
    assert sender is not None and sender.provider == "vonage"
    assert sender.keywords["help"]["replies"] == REPLIES["help"]
    assert shop is not None and shop.keywords["opt_out"]["replies"] == {}


async def test_seed_senders_refuses_a_bad_file_and_changes_nothing(
    tmp_path: Path, world: World, session_factory: SessionFactory
) -> None:
    path = write_json(
        tmp_path,
        [
            {"address": "GOOD", "kind": "alphanumeric", "provider": "fake"},
            {"address": "12", "kind": "short_code", "provider": "fake"},
        ],
    )

    result = await smsgate("seed-senders", path)

    assert result.returncode != 0
    assert "12: address: a short code is 3 to 8 digits" in result.stderr
    async with session_factory() as session:
        assert await session.scalar(select(Sender).where(Sender.address == "GOOD")) is None


async def test_create_api_key_prints_a_key_that_is_stored_hashed(
    world: World, session_factory: SessionFactory
) -> None:
    result = await smsgate("create-api-key", "--client", "billing", "--default-sender", "ACME")

    assert result.returncode == 0, result.stderr
    raw_key = result.stdout.strip()
    assert raw_key.startswith("sk_") and len(raw_key) > 40
    async with session_factory() as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key)))
        client = await session.scalar(select(Client).where(Client.name == "billing"))
    assert key is not None and client is not None and key.client_id == client.id
    assert client.default_sender_id == world.vonage_sender.id
    assert raw_key.encode() not in key.key_hash  # only the hash is stored
