"""Held messages (the SMS pumping alarm's `hold` action): a partial index on a client's `held`
messages, oldest first, for the admin's bulk release or cancel. `status` has no check constraint,
so the new status needs none.

The index covers `held` messages only (none exist before this revision): small to build, but built
without CONCURRENTLY, so it scans `messages` once while holding its writes.

Revision ID: held_messages
Revises: status_check_schedule
Create Date: 2026-12-04 23:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'held_messages'
down_revision: str | None = 'status_check_schedule'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_messages_held',
        'messages',
        ['client_id', 'created_at'],
        unique=False,
        postgresql_where=sa.text("status = 'held'"),
    )


def downgrade() -> None:
    op.drop_index('ix_messages_held', table_name='messages', postgresql_where=sa.text("status = 'held'"))
