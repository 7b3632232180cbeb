"""Signing secrets encrypted at rest (AES-256-GCM under SECRETS_KEY, app.kernel.secrets): the
column widens for the ciphertext and every plain `whsec_` secret is encrypted in place. The
downgrade decrypts them again (it needs the same key).

Revision ID: 7e3a9c41b2d8
Revises: message_parts
Create Date: 2026-12-04 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.kernel.secrets import Keyring
from app.kernel.settings import Settings

revision: str = '7e3a9c41b2d8'
down_revision: str | None = 'message_parts'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rows(where: str) -> list[tuple[int, str]]:
    result = op.get_bind().execute(sa.text(f"SELECT id, secret FROM signing_secrets WHERE {where}"))
    return [(row[0], row[1]) for row in result]


def _write(rows: list[tuple[int, str]]) -> None:
    for row_id, value in rows:
        op.get_bind().execute(
            sa.text("UPDATE signing_secrets SET secret = :secret WHERE id = :id"),
            {"secret": value, "id": row_id},
        )


def upgrade() -> None:
    op.alter_column(
        'signing_secrets', 'secret', type_=sa.String(length=200),
        existing_type=sa.String(length=100), existing_nullable=False,
    )
    plain = _rows("secret LIKE 'whsec\\_%'")
    if plain:  # only then is the key needed: a new database migrates without one
        keyring = Keyring.from_settings(Settings())
        _write([(row_id, keyring.encrypt(secret)) for row_id, secret in plain])


def downgrade() -> None:
    encrypted = _rows("secret NOT LIKE 'whsec\\_%'")
    if encrypted:
        keyring = Keyring.from_settings(Settings())
        _write([(row_id, keyring.decrypt(secret)) for row_id, secret in encrypted])
    op.alter_column(
        'signing_secrets', 'secret', type_=sa.String(length=100),
        existing_type=sa.String(length=200), existing_nullable=False,
    )
