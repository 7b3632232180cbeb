"""`smsgate`: one entry point for the API, the worker, migrations and API keys."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from app.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent


def migrate(database_url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database schema to `revision` with Alembic."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    if database_url:
        config.attributes["database_url"] = database_url
    command.upgrade(config, revision)


async def _create_api_key(client: str, admin: bool, default_sender: str | None) -> str:
    from sqlalchemy import select, update

    from app.db.models import Client, Sender
    from app.db.session import create_engine, create_session_factory
    from app.domain.auth import create_api_key

    settings = get_settings()
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with create_session_factory(engine).begin() as session:
            raw_key = await create_api_key(session, client, is_admin=admin)
            if default_sender is not None:
                sender_id = await session.scalar(
                    select(Sender.id).where(Sender.address == default_sender)
                )
                if sender_id is None:
                    raise SystemExit(f"no sender with address {default_sender!r}")
                await session.execute(
                    update(Client).where(Client.name == client).values(default_sender_id=sender_id)
                )
    finally:
        await engine.dispose()
    return raw_key


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="smsgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="API processes")

    commands.add_parser("worker", help="run a delivery worker (arq)")
    commands.add_parser("migrate", help="upgrade the database schema to the latest revision")

    key = commands.add_parser("create-api-key", help="create an API key and print it once")
    key.add_argument("--client", required=True, help="client name (created if new)")
    key.add_argument("--admin", action="store_true", help="may manage senders")
    key.add_argument("--default-sender", help="address of the client's default sender")

    args = parser.parse_args(argv)
    if args.command == "serve":
        import uvicorn

        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=get_settings().log_level.lower(),
        )
    elif args.command == "worker":
        from arq.worker import run_worker

        from app.worker.tasks import WorkerSettings

        run_worker(WorkerSettings)  # type: ignore[arg-type]
    elif args.command == "migrate":
        migrate()
    elif args.command == "create-api-key":
        raw_key = asyncio.run(_create_api_key(args.client, args.admin, args.default_sender))
        sys.stdout.write(raw_key + "\n")


if __name__ == "__main__":
    main()
