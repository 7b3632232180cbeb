"""Message parts: each part of a long message and its own delivery receipt (Vonage reports
every part on its own), so a message settles from all its parts.

Revision ID: message_parts
Revises: sender_grants_key_lifecycle
Create Date: 2026-12-04 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'message_parts'
down_revision: str | None = 'sender_grants_key_lifecycle'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'message_parts',
        sa.Column('message_id', sa.UUID(), nullable=False),
        sa.Column('provider_message_id', sa.String(length=64), nullable=False),
        sa.Column('number', sa.SmallInteger(), nullable=True),
        sa.Column('total', sa.SmallInteger(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=True),
        sa.Column('provider_status', sa.String(length=32), nullable=True),
        sa.Column('error_code', sa.String(length=32), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.Column(
            'updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ['message_id'],
            ['messages.id'],
            name=op.f('fk_message_parts_message_id_messages'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('message_id', 'provider_message_id', name=op.f('pk_message_parts')),
    )
    op.create_index(
        'ix_message_parts_provider_message', 'message_parts', ['provider_message_id'], unique=False
    )


def downgrade() -> None:
    op.drop_index('ix_message_parts_provider_message', table_name='message_parts')
    op.drop_table('message_parts')
