"""The SMS pumping defence: a client's own alarm settings (`clients.pumping`, JSON, set by an
admin; null: the service's), and a partial index on a client's `held` messages, oldest first,
for the admin's bulk release or cancel. `messages.status` has no check constraint, so the new
`held` status needs none.

A new nullable column (no table rewrite). The index covers `held` messages only (none exist
before this revision): small, but built without CONCURRENTLY, so it scans `messages` once while
holding its writes (README, "Known limits"). A downgrade cancels the messages still `held`.

Revision ID: pumping_defence
Revises: client_traffic
Create Date: 2026-12-04 23:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'pumping_defence'
down_revision: str | None = 'client_traffic'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('clients', sa.Column('pumping', postgresql.JSONB(), nullable=True))
    op.create_index(
        'ix_messages_held',
        'messages',
        ['client_id', 'created_at'],
        unique=False,
        postgresql_where=sa.text("status = 'held'"),
    )


def downgrade() -> None:
    # Before this revision no code knows `held`: a held message would be stranded (no admin
    # could release or cancel it). It is canceled, as an admin would by default: it was held as
    # suspected SMS pumping, and releasing it unseen would send what the alarm stopped. No
    # `message.canceled` event goes out: the outbox is not the migration's.
    op.execute(
        "UPDATE messages SET status = 'canceled', error_code = 'canceled', "
        "error_message = 'canceled by a schema downgrade (held as suspected SMS pumping)', "
        "updated_at = now() WHERE status = 'held'"
    )
    op.drop_index('ix_messages_held', table_name='messages', postgresql_where=sa.text("status = 'held'"))
    op.drop_column('clients', 'pumping')
