"""Senders belong to clients (`sender_clients`); API keys get a name, an expiry and a last-use
time.

Existing senders are granted to every client that has sent from them and to every client whose
default sender they are, so no client loses a sender it uses. The grant is read from the
messages table once (a full scan: run it when a minute of extra load is fine).

Revision ID: sender_grants_key_lifecycle
Revises: 1c66deacd215
Create Date: 2026-12-04 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'sender_grants_key_lifecycle'
down_revision: str | None = '1c66deacd215'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'sender_clients',
        sa.Column('sender_id', postgresql.UUID(), nullable=False),
        sa.Column('client_id', postgresql.UUID(), nullable=False),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ['client_id'],
            ['clients.id'],
            name=op.f('fk_sender_clients_client_id_clients'),
            ondelete='CASCADE',
        ),
        sa.ForeignKeyConstraint(
            ['sender_id'],
            ['senders.id'],
            name=op.f('fk_sender_clients_sender_id_senders'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('sender_id', 'client_id', name=op.f('pk_sender_clients')),
    )
    op.create_index(
        op.f('ix_sender_clients_client_id'), 'sender_clients', ['client_id'], unique=False
    )
    op.execute(
        """
        INSERT INTO sender_clients (sender_id, client_id)
        SELECT DISTINCT sender_id, client_id FROM messages WHERE client_id IS NOT NULL
        UNION
        SELECT default_sender_id, id FROM clients WHERE default_sender_id IS NOT NULL
        """
    )
    op.add_column('api_keys', sa.Column('name', sa.String(length=200), nullable=True))
    op.add_column('api_keys', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_keys', sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # The older code knows no expiry: a key that expired (or whose rotation overlap ended, or
    # is still running) would work again. Revoke them before the column goes.
    op.execute(
        "UPDATE api_keys SET revoked_at = LEAST(expires_at, now()) "
        "WHERE expires_at IS NOT NULL AND revoked_at IS NULL"
    )
    op.drop_column('api_keys', 'last_used_at')
    op.drop_column('api_keys', 'expires_at')
    op.drop_column('api_keys', 'name')
    op.drop_index(op.f('ix_sender_clients_client_id'), table_name='sender_clients')
    op.drop_table('sender_clients')
