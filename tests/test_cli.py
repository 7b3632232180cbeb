"""The `smsgate` command, run as a subprocess against the test database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from app.access.auth import hash_key
from app.db.models import ApiKey, Client, OptOut, Sender
from app.db.session import SessionFactory
from tests.conftest import REPLIES, TEST_REDIS_URL, World, owned_database_url, ready_keywords
from tests.processes import (
    clean_env,
    free_port,
    run_smsgate,
    start_smsgate,
    stop,
    wait_for,
    wait_http_ok,
)

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
            {"address": "SHOP", "kind": "alphanumeric", "provider": "vonage", "countries": ["FR"]},
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
    assert (shop.countries, sender.countries) == (["FR"], None)  # for sender pools


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
    # A client's default sender is one of its senders.
    assert (await smsgate("sender-clients", "ACME")).stdout.splitlines() == [
        "billing",
        "other-shop",
        "shop",
    ]


async def test_api_keys_are_listed_revoked_and_rotated_from_the_command_line(
    world: World, session_factory: SessionFactory
) -> None:
    created = await smsgate(
        "api-keys", "create", "--client", "billing", "--name", "billing backend",
        "--expires-in", "3600",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    raw_key = created.stdout.strip()

    listed = await smsgate("api-keys", "list", "--client", "billing")
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split("\t") == [
        "id", "client", "name", "prefix", "admin", "status", "created", "last used", "expires",
    ]  # fmt: skip
    fields = line.split("\t")
    assert fields[1:6] == ["billing", "billing backend", raw_key[:10], "-", "active"]
    assert fields[7] == "-" and fields[8] != "-"  # never used; expires in an hour
    assert raw_key not in listed.stdout

    rotated = await smsgate("api-keys", "rotate", raw_key[:10], "--overlap", "0")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip()
    assert new_key.startswith("sk_") and new_key != raw_key
    revoked = await smsgate("api-keys", "revoke", fields[0])
    unknown = await smsgate("api-keys", "revoke", "sk_nothing")

    assert revoked.returncode == 0, revoked.stderr
    assert unknown.returncode == 1 and "no API key sk_nothing" in unknown.stderr
    async with session_factory() as session:
        old = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key)))
        new = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(new_key)))
    assert old is not None and old.revoked_at is not None and old.expires_at is not None
    assert new is not None and new.revoked_at is None and new.name == "billing backend"


@pytest.mark.parametrize(
    "args",
    [
        ("create", "--client", "billing", "--expires-in", "0"),  # not "never"
        ("create", "--client", "billing", "--expires-in", "99999999999999"),  # no overflow
        ("rotate", "sk_anything", "--overlap", "-1"),
        ("rotate", "sk_anything", "--overlap", str(30 * 86400 + 1)),  # the API's bound too
    ],
)
async def test_key_times_out_of_range_are_refused_by_the_command_line(
    world: World, args: tuple[str, ...]
) -> None:
    result = await smsgate("api-keys", *args)

    assert result.returncode == 2 and "seconds" in result.stderr
    assert "Traceback" not in result.stderr


async def test_senders_are_granted_and_revoked_from_the_command_line(world: World) -> None:
    await smsgate("create-api-key", "--client", "billing")

    granted = await smsgate("grant-sender", "(415) 555-0100", "--client", "billing")
    revoked = await smsgate("revoke-sender", "+14155550100", "--client", "shop")
    unknown = await smsgate("grant-sender", "+14155550177", "--client", "billing")
    nobody = await smsgate("grant-sender", "ACME", "--client", "nobody")

    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.splitlines() == ["billing", "other-shop", "shop"]
    assert revoked.stdout.splitlines() == ["billing", "other-shop"]
    assert unknown.returncode == 1 and "no sender with address" in unknown.stderr
    assert nobody.returncode == 1 and "no client named 'nobody'" in nobody.stderr


# The commands for people at a terminal, each run as a subprocess.

SUBCOMMANDS = [
    "serve",
    "worker",
    "migrate",
    "create-api-key",
    "seed-senders",
    "dev",
    "services",
    "send",
    "import-opt-outs",
    "api-keys",
    "grant-sender",
    "revoke-sender",
    "sender-clients",
]


def service_env(**values: str) -> dict[str, str]:
    """The environment of a service process on the test database and Redis."""
    # A few pooled connections, not production's 32: the test database is shared with the suite.
    return clean_env(
        DATABASE_URL=owned_database_url(), REDIS_URL=TEST_REDIS_URL, DB_POOL_SIZE="4", **values
    )


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_smsgate, *args, env=env or service_env())


def undocumented(help_text: str) -> list[str]:
    """Arguments in `--help` output that have no description beside or below them."""
    lines = help_text.splitlines()
    missing = []
    for index, line in enumerate(lines):
        if re.match(r"^  \S", line) and not re.search(r"\S {2,}\S", line.strip()):
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if not following.startswith("    "):
                missing.append(line.strip())
    return missing


async def test_every_subcommand_has_help() -> None:
    overview, *helps = await asyncio.gather(
        cli("--help", env=clean_env()),
        *(cli(command, "--help", env=clean_env()) for command in SUBCOMMANDS),
    )

    assert overview.returncode == 0
    for command in SUBCOMMANDS:
        assert re.search(rf"^    {command} +\S", overview.stdout, re.MULTILINE), command
    for command, result in zip(SUBCOMMANDS, helps, strict=True):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: smsgate {command}")
        assert undocumented(result.stdout) == [], command


@pytest.fixture(scope="module")
def live_api(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`smsgate serve` on a free port of 127.0.0.1, on the test database and Redis."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    api = start_smsgate("serve", "--port", str(port), env=service_env(), log=log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", api, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(api)


@pytest.fixture
def worker(redis: Redis, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`smsgate worker` on the emptied test Redis; the fake provider reports at once."""
    log = tmp_path / "worker.log"
    process = start_smsgate("worker", env=service_env(FAKE__DELIVERY_DELAY_SECONDS="0"), log=log)
    yield process
    stop(process)


def send_args(api_url: str, key: str, sender: str, *more: str) -> list[str]:
    return ["send", "--to", "(415) 555-0123", "--body", "Your order has shipped.",
            "--from", sender, "--api-url", api_url, "--api-key", key, *more]  # fmt: skip


async def test_send_prints_the_accepted_message(world: World, live_api: str, redis: Redis) -> None:
    result = await cli(*send_args(live_api, world.client_key, "+14155550199"))

    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)
    assert message["status"] == "queued"
    assert (message["to"], message["from"]) == ("+14155550123", "+14155550199")


async def test_send_wait_follows_the_message_until_it_is_delivered(
    world: World, live_api: str, worker: subprocess.Popen[bytes]
) -> None:
    result = await cli(*send_args(live_api, world.client_key, "+14155550199", "--wait"))

    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)
    assert message["status"] == "delivered"
    assert result.stderr.splitlines()[0] == f"{message['id']}: queued"
    assert result.stderr.splitlines()[-1] == f"{message['id']}: delivered"


async def test_send_wait_exits_1_when_the_message_fails(
    world: World, live_api: str, worker: subprocess.Popen[bytes]
) -> None:
    # The worker has no Twilio credentials: a message from the Twilio sender fails.
    result = await cli(*send_args(live_api, world.client_key, "+14155550100", "--wait"))

    assert result.returncode == 1
    message = json.loads(result.stdout)
    assert (message["status"], message["error_code"]) == ("failed", "provider_not_configured")


async def test_send_wait_gives_up_after_its_timeout(
    world: World, live_api: str, redis: Redis
) -> None:
    # No worker runs: the message stays queued.
    args = send_args(live_api, world.client_key, "+14155550199", "--wait", "--timeout", "1")

    result = await cli(*args)

    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "queued"
    assert "still queued after 1 s" in result.stderr


async def test_send_reports_a_refusal_and_finds_its_key_in_env_or_the_dev_data_dir(
    world: World, live_api: str, redis: Redis, tmp_path: Path
) -> None:
    refused = await cli(*send_args(live_api, "sk_unknown", "+14155550199"))

    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "invalid_api_key" in refused.stderr

    no_key = await cli(
        "send", "--to", "+14155550123", "--body", "Hi",
        env=clean_env(SMSGATE_API_URL=live_api, DEV_DATA_DIR=str(tmp_path)),
    )  # fmt: skip

    assert no_key.returncode == 2 and "no API key" in no_key.stderr

    (tmp_path / "dev-api-key").write_text(world.client_key + "\n")
    from_file = await cli(
        "send", "--to", "+14155550123", "--body", "Hi", "--from", "+14155550199",
        env=clean_env(SMSGATE_API_URL=live_api, DEV_DATA_DIR=str(tmp_path)),
    )  # fmt: skip
    from_env = await cli(
        "send", "--to", "+14155550124", "--body", "Hi", "--from", "+14155550199",
        env=clean_env(SMSGATE_API_URL=live_api, SMSGATE_API_KEY=world.client_key),
    )  # fmt: skip

    assert from_file.returncode == 0, from_file.stderr
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout)["to"] == "+14155550124"


async def test_import_opt_outs_in_batches_showing_progress_and_line_errors(
    tmp_path: Path, world: World, session_factory: SessionFactory
) -> None:
    lines = ["phone,sender"] + [f"+1415555{number:04d}" for number in range(110, 122)]
    lines[3] = "12345"  # line 4: not a number
    lines[8] = "(415) 555-0117,NOPE"  # line 9, in the second batch: not one of our senders
    lines[11] = "+14155550120,+14155550199"  # line 12: opted out of one sender only
    path = tmp_path / "opt-outs.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = await cli("import-opt-outs", str(path), "--batch-size", "5")

    assert result.returncode == 1  # some lines were skipped
    assert result.stdout == "10 opt-outs recorded, 2 lines skipped\n"
    progress = [line for line in result.stderr.splitlines() if line.endswith(" lines")]
    assert progress == ["5/13 lines", "10/13 lines", "13/13 lines"]
    assert "line 4: '12345': " in result.stderr
    assert "line 9: 'NOPE': not one of our senders" in result.stderr
    async with session_factory() as session:
        rows = list(await session.scalars(select(OptOut).order_by(OptOut.phone)))
    assert len(rows) == 10
    assert {(row.source, row.action) for row in rows} == {("import", "opt_out")}
    assert all(row.actor and row.actor.startswith("operator:") for row in rows)
    one_sender = [row for row in rows if row.sender_id is not None]
    assert [(row.phone, row.sender_id) for row in one_sender] == [
        ("+14155550120", world.fake_sender.id)
    ]


async def test_import_opt_outs_of_a_clean_file_exits_0(
    tmp_path: Path, world: World, session_factory: SessionFactory
) -> None:
    path = tmp_path / "opt-outs.csv"
    path.write_text("\ufeff+14155550130\n\n(415) 555-0131\n", encoding="utf-8")  # BOM, blank

    result = await cli("import-opt-outs", str(path), "--actor", "operator:alice")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 opt-outs recorded, 0 lines skipped\n"
    async with session_factory() as session:
        actors = set(await session.scalars(select(OptOut.actor)))
        count = await session.scalar(select(func.count()).select_from(OptOut))
    assert (actors, count) == ({"operator:alice"}, 2)


async def test_worker_check_passes_only_while_a_worker_runs(redis: Redis, tmp_path: Path) -> None:
    before = await cli("worker", "--check")

    assert before.returncode == 1
    assert before.stdout.endswith("no worker reported recently\n")  # after arq's log line

    process = start_smsgate("worker", env=service_env(), log=tmp_path / "worker.log")
    try:

        def healthy() -> bool:
            return run_smsgate("worker", "--check", env=service_env()).returncode == 0

        await asyncio.to_thread(wait_for, healthy, 30, "a healthy worker")
    finally:
        assert stop(process) == 0

    after = await cli("worker", "--check")  # a worker that stops removes its health key

    assert after.returncode == 1
