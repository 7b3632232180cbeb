"""Status checks scheduled per message: when a `sent` message is next asked about at its
provider (`next_check_at`, with back-off), how many times it was (`status_checks`), and why the
service stopped (`status_detail`, shown in the API); a partial index on `sent` messages serves
the status-check sweep.

New nullable or defaulted columns (no table rewrite); the index covers `sent` messages only.

Revision ID: status_check_schedule
Revises: months_of_traffic
Create Date: 2026-12-04 21:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'status_check_schedule'
down_revision: str | None = 'months_of_traffic'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('messages', sa.Column('next_check_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        'messages',
        sa.Column('status_checks', sa.SmallInteger(), server_default=sa.text('0'), nullable=False),
    )
    op.add_column('messages', sa.Column('status_detail', sa.Text(), nullable=True))
    op.create_index(
        'ix_messages_sent_check',
        'messages',
        ['next_check_at', 'updated_at'],
        unique=False,
        postgresql_where=sa.text("status = 'sent'"),
    )


def downgrade() -> None:
    op.drop_index('ix_messages_sent_check', table_name='messages', postgresql_where=sa.text("status = 'sent'"))
    op.drop_column('messages', 'status_detail')
    op.drop_column('messages', 'status_checks')
    op.drop_column('messages', 'next_check_at')
