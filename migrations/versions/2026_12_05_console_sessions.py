"""The operator console's sessions: one row per signed-in operator (the SHA-256 of the
cookie's token, the admin key, the CSRF token, when it ends), deleted at sign-out and by the
retention job once expired. A new, empty table: no lock on anything in use.

Revision ID: console_sessions
Revises: scheduled_sends
Create Date: 2026-12-05 02:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'console_sessions'
down_revision: str | None = 'scheduled_sends'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'console_sessions',
        sa.Column('token_hash', sa.LargeBinary(length=32), nullable=False),
        sa.Column('api_key_id', sa.UUID(), nullable=False),
        sa.Column('csrf_token', sa.String(length=64), nullable=False),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            'last_seen_at',
            sa.DateTime(timezone=True),
            server_default=sa.text('now()'),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ['api_key_id'],
            ['api_keys.id'],
            name=op.f('fk_console_sessions_api_key_id_api_keys'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('token_hash', name=op.f('pk_console_sessions')),
    )
    op.create_index(
        op.f('ix_console_sessions_api_key_id'), 'console_sessions', ['api_key_id'], unique=False
    )
    op.create_index(
        op.f('ix_console_sessions_expires_at'), 'console_sessions', ['expires_at'], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f('ix_console_sessions_expires_at'), table_name='console_sessions')
    op.drop_index(op.f('ix_console_sessions_api_key_id'), table_name='console_sessions')
    op.drop_table('console_sessions')
