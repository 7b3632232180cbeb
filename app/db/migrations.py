"""Where the Alembic configuration is, and which revision is the newest."""

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
