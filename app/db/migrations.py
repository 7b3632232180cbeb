"""Where the Alembic configuration is, which revision is the newest, and applying it."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parent.parent.parent


def alembic_config(database_url: str | None = None) -> Config:
    """The project's Alembic configuration, pointed at `database_url` when given.

    From a checkout, alembic.ini is beside app/; in the container image, in the working
    directory.
    """
    candidates = [ROOT / "alembic.ini", Path.cwd() / "alembic.ini"]
    ini = next((path for path in candidates if path.is_file()), None)
    if ini is None:
        raise FileNotFoundError(
            "alembic.ini not found beside the app package or in the current directory"
        )
    config = Config(str(ini))
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str | None:
    """The newest migration this code ships (what the database should be at)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def migrate(database_url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database schema to `revision` with Alembic."""
    from alembic import command

    try:
        config = alembic_config(database_url)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    command.upgrade(config, revision)


async def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in `database_url` if it does not exist; True if created."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    url = make_url(database_url)
    name = url.database
    if not name:
        raise SystemExit("DATABASE_URL names no database")
    server = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with server.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if exists:
                return False
            quoted = name.replace('"', '""')
            await connection.execute(text(f'CREATE DATABASE "{quoted}"'))
            return True
    finally:
        await server.dispose()
