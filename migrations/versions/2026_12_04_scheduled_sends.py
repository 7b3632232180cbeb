"""Scheduled sends and quiet hours: a message's `send_at` (a `scheduled` message waits for it),
a partial index on the scheduled ones' `send_at` for the scheduler, and a client's quiet hours
(both times or neither).

New nullable columns (no table rewrite); the index covers `scheduled` messages only (none exist
before this revision), but is built without CONCURRENTLY (the migrations run in one
transaction), so it scans `messages` once while holding its writes (README, "Known limits").
A downgrade cancels the messages still `scheduled`.

Revision ID: scheduled_sends
Revises: sender_pools
Create Date: 2026-12-04 23:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'scheduled_sends'
down_revision: str | None = 'sender_pools'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('messages', sa.Column('send_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        'ix_messages_scheduled_due',
        'messages',
        ['send_at'],
        unique=False,
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.add_column('clients', sa.Column('quiet_hours_start', sa.Time(), nullable=True))
    op.add_column('clients', sa.Column('quiet_hours_end', sa.Time(), nullable=True))
    op.create_check_constraint(
        op.f('ck_clients_quiet_hours'),
        'clients',
        '(quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)',
    )


def downgrade() -> None:
    # Before this revision no code knows `scheduled` nor `send_at`: a scheduled message would be
    # stranded (never sent, never settled). It is canceled, the state older code reads as final
    # and which never sends anything early (sending it now could break the client's schedule or
    # quiet hours); refusing to downgrade instead would leave an operator rolling back a bad
    # release stuck. No `message.canceled` event goes out: the outbox is not the migration's.
    op.execute(
        "UPDATE messages SET status = 'canceled', error_code = 'canceled', "
        "error_message = 'canceled by a schema downgrade (scheduled, unsent)', "
        "updated_at = now() WHERE status = 'scheduled'"
    )
    op.drop_constraint(op.f('ck_clients_quiet_hours'), 'clients', type_='check')
    op.drop_column('clients', 'quiet_hours_end')
    op.drop_column('clients', 'quiet_hours_start')
    op.drop_index(
        'ix_messages_scheduled_due',
        table_name='messages',
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.drop_column('messages', 'send_at')
