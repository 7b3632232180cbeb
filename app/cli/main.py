"""`smsgate`: one entry point for the API, the worker, migrations and API keys, plus tools for
development and operations (`dev`, `services`, `send`, `import-opt-outs`: app/cli/commands.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from app.cli.admin import add_admin_commands
from app.cli.commands import add_commands
from app.kernel.settings import get_settings


async def _create_api_key(
    client: str, admin: bool, default_sender: str | None, name: str | None = None
) -> str:
    from sqlalchemy import select, update

    from app.access.auth import create_api_key
    from app.db.models import Client, Sender
    from app.db.session import create_engine, create_session_factory
    from app.senders.service import grant_sender

    settings = get_settings()
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with create_session_factory(engine).begin() as session:
            raw_key = await create_api_key(session, client, is_admin=admin, name=name)
            if default_sender is not None:
                sender_id = await session.scalar(
                    select(Sender.id).where(Sender.address == default_sender)
                )
                if sender_id is None:
                    raise SystemExit(f"no sender with address {default_sender!r}")
                # A client's default sender is one of its senders.
                await grant_sender(session, sender_id, client)
                await session.execute(
                    update(Client).where(Client.name == client).values(default_sender_id=sender_id)
                )
    finally:
        await engine.dispose()
    return raw_key


async def _seed_senders(path: Path) -> tuple[int, int]:
    from pydantic import TypeAdapter, ValidationError

    from app.db.session import create_engine, create_session_factory
    from app.kernel.errors import ServiceError
    from app.senders.schemas import SenderIn
    from app.senders.service import upsert_sender

    try:
        specs = TypeAdapter(list[SenderIn]).validate_json(path.read_bytes())
    except (OSError, ValidationError) as error:
        raise SystemExit(f"{path}: {error}") from None
    settings = get_settings()
    engine = create_engine(settings.database_url, pool_size=1)
    created = updated = 0
    try:
        async with create_session_factory(engine).begin() as session:
            for spec in specs:
                try:
                    is_new = await upsert_sender(
                        session,
                        address=spec.address,
                        kind=spec.kind,
                        provider=spec.provider,
                        description=spec.description,
                        keywords=spec.keywords,
                        default_region=settings.default_region,
                        rate_per_second=spec.rate_per_second,
                        fallback_provider=spec.fallback_provider,
                        countries=spec.countries,
                    )
                except ServiceError as error:
                    raise SystemExit(f"{path}: {spec.address}: {error.detail}") from None
                created += is_new
                updated += not is_new
    finally:
        await engine.dispose()
    return created, updated


async def _reencrypt_secrets() -> tuple[int, int]:
    """Rewrite every signing secret and Twilio auth token not encrypted with the current
    SECRETS_KEY (a rotation): (rewritten, total). Reads with the previous keys, writes with the
    current one."""
    from sqlalchemy import text

    from app.db.session import create_engine
    from app.kernel.secrets import Keyring

    keyring = Keyring.from_settings(get_settings())
    engine = create_engine(get_settings().database_url, pool_size=1)
    rewritten = total = 0
    try:
        async with engine.begin() as connection:
            for table, key, column in (
                ("signing_secrets", "id", "secret"),
                ("twilio_credentials", "client_id", "auth_token"),
            ):
                rows = (
                    await connection.execute(
                        text(f"SELECT {key}, {column} FROM {table} FOR UPDATE")
                    )
                ).all()
                for row_id, stored in rows:
                    total += 1
                    if keyring.is_current(stored):
                        continue
                    await connection.execute(
                        text(f"UPDATE {table} SET {column} = :secret WHERE {key} = :id"),
                        {"secret": keyring.encrypt(keyring.decrypt(stored)), "id": row_id},
                    )
                    rewritten += 1
    finally:
        await engine.dispose()
    return rewritten, total


# The processes that talk to providers, or prepare for them: they refuse to start on a provider
# setting that cannot be read.
_NEEDS_PROVIDER_SETTINGS = frozenset({"serve", "worker", "migrate"})


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen subcommand."""
    args = _parser().parse_args(argv)
    if args.command in _NEEDS_PROVIDER_SETTINGS:
        from app.providers.registry import read_provider_settings

        read_provider_settings(get_settings())
    if getattr(args, "run", None) is not None:
        raise SystemExit(args.run(args))
    run = _RUNS.get(args.command)
    if run is not None:
        run(args)


def _parser() -> argparse.ArgumentParser:
    """`smsgate`'s parser: this module's subcommands, then commands.py's and admin.py's."""
    parser = argparse.ArgumentParser(prog="smsgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_process_commands(commands)  # serve, worker, migrate
    _add_setup_commands(commands)  # create-api-key, seed-senders, *-secrets-key
    add_commands(commands)  # dev, services, send, import-opt-outs
    add_admin_commands(commands)  # api-keys, grant-sender, revoke-sender, sender-clients
    return parser


def _add_process_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The long-running processes, and the schema they need."""
    serve = commands.add_parser("serve", help="run the HTTP API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="API processes")

    worker = commands.add_parser("worker", help="run a delivery worker (arq)")
    worker.add_argument(
        "--check",
        action="store_true",
        help="instead, exit 0 if a worker recorded its health check recently, else 1",
    )
    worker.add_argument(
        "--queue",
        choices=("sms", "events"),
        default="sms",
        help="sms: send messages (the default); events: deliver events to clients' endpoints "
        "(a queue of its own, so a slow endpoint never delays an SMS)",
    )
    migrate_command = commands.add_parser(
        "migrate", help="upgrade the database schema to the latest revision"
    )
    migrate_command.add_argument(
        "--create-database", action="store_true", help="create the database first if missing"
    )


def _add_setup_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """One-off setup: the first API keys and senders, and the secrets key."""
    key = commands.add_parser("create-api-key", help="create an API key and print it once")
    key.add_argument("--client", required=True, help="client name (created if new)")
    key.add_argument("--admin", action="store_true", help="may manage senders")
    key.add_argument(
        "--default-sender", help="address of the client's default sender (granted to it)"
    )
    key.add_argument("--name", help="what the key is for, shown by `smsgate api-keys list`")

    seed = commands.add_parser(
        "seed-senders",
        help="create or update senders (and their keywords) from a JSON file, in one transaction",
    )
    seed.add_argument("file", type=Path, help="a JSON list of senders, as POST /v1/senders takes")

    commands.add_parser(
        "generate-secrets-key", help="print a new SECRETS_KEY (32 random bytes, base64)"
    )
    commands.add_parser(
        "reencrypt-secrets",
        help="re-encrypt every signing secret with SECRETS_KEY (after a key rotation; the old "
        "key must be in SECRETS_PREVIOUS_KEYS)",
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.kernel.logs import logging_config
    from app.web.server import uvicorn_options

    settings = get_settings()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=logging_config(
            settings.log_level, settings.log_format, redact=not settings.log_message_bodies
        ),
        **uvicorn_options(settings),
    )


def _worker(args: argparse.Namespace) -> None:
    from app.worker.entry import run

    run(args.queue, check=args.check)


def _migrate(args: argparse.Namespace) -> None:
    from app.db.migrations import create_database_if_missing, migrate

    if args.create_database:
        asyncio.run(create_database_if_missing(get_settings().database_url))
    migrate()


def _seed(args: argparse.Namespace) -> None:
    created, updated = asyncio.run(_seed_senders(args.file))
    sys.stdout.write(f"{created} senders created, {updated} updated\n")


def _generate_secrets_key(args: argparse.Namespace) -> None:
    from app.kernel.secrets import generate_key

    sys.stdout.write(generate_key() + "\n")


def _reencrypt(args: argparse.Namespace) -> None:
    rewritten, total = asyncio.run(_reencrypt_secrets())
    sys.stdout.write(f"{rewritten} of {total} secrets re-encrypted\n")


def _api_key(args: argparse.Namespace) -> None:
    raw_key = asyncio.run(_create_api_key(args.client, args.admin, args.default_sender, args.name))
    sys.stdout.write(raw_key + "\n")


# This module's subcommands (the others set `run` on their parsers).
_RUNS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": _serve,
    "worker": _worker,
    "migrate": _migrate,
    "seed-senders": _seed,
    "generate-secrets-key": _generate_secrets_key,
    "reencrypt-secrets": _reencrypt,
    "create-api-key": _api_key,
}


if __name__ == "__main__":
    main()
