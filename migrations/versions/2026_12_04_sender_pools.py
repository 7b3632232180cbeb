"""Sender pools: the destination countries a sender serves (`senders.countries`) and the sender
picked for each (client, recipient) (`sender_affinity`).

Both are new and empty (a sender's countries default to its kind's: NULL), so the migration
takes no time on a large database.

Revision ID: sender_pools
Revises: pumping_defence
Create Date: 2026-12-04 23:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'sender_pools'
down_revision: str | None = 'pumping_defence'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'senders', sa.Column('countries', postgresql.ARRAY(sa.String(length=2)), nullable=True)
    )
    op.create_table(
        'sender_affinity',
        sa.Column('client_id', postgresql.UUID(), nullable=False),
        sa.Column('recipient', sa.String(length=16), nullable=False),
        sa.Column('sender_id', postgresql.UUID(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['client_id'],
            ['clients.id'],
            name=op.f('fk_sender_affinity_client_id_clients'),
            ondelete='CASCADE',
        ),
        sa.ForeignKeyConstraint(
            ['sender_id'],
            ['senders.id'],
            name=op.f('fk_sender_affinity_sender_id_senders'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('client_id', 'recipient', name=op.f('pk_sender_affinity')),
    )
    op.create_index(
        op.f('ix_sender_affinity_last_used_at'), 'sender_affinity', ['last_used_at'], unique=False
    )
    op.create_index(
        op.f('ix_sender_affinity_sender_id'), 'sender_affinity', ['sender_id'], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f('ix_sender_affinity_sender_id'), table_name='sender_affinity')
    op.drop_index(op.f('ix_sender_affinity_last_used_at'), table_name='sender_affinity')
    op.drop_table('sender_affinity')
    op.drop_column('senders', 'countries')
