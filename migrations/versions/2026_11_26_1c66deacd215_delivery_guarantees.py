"""Delivery guarantees: senders' rates and fallback providers; messages' claim time (for
reconciling claims a dead worker left behind) and resubmission count.

Revision ID: 1c66deacd215
Revises: 6c1d0e5f9a47
Create Date: 2026-11-26 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '1c66deacd215'
down_revision: str | None = '6c1d0e5f9a47'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The defaults `app.kernel.sender_rates.default_rate` gives new senders: a US long code 1/s, a US or
# Canadian toll-free number 3/s, a short code 100/s, an alphanumeric sender ID 10/s.
DEFAULT_RATES = """
    CASE
        WHEN kind = 'short_code' THEN 100
        WHEN kind = 'alphanumeric' THEN 10
        WHEN address ~ '^\\+1(800|833|844|855|866|877|888)' THEN 3
        ELSE 1
    END
"""


def upgrade() -> None:
    op.add_column('senders', sa.Column('fallback_provider', sa.String(length=20), nullable=True))
    op.add_column('senders', sa.Column('rate_per_second', sa.Float(), nullable=True))
    op.execute(f"UPDATE senders SET rate_per_second = {DEFAULT_RATES}")
    op.alter_column('senders', 'rate_per_second', nullable=False)
    op.create_check_constraint(
        op.f('ck_senders_fallback_provider'),
        'senders',
        "fallback_provider IN ('twilio', 'vonage', 'fake') AND fallback_provider <> provider",
    )
    op.create_check_constraint(
        op.f('ck_senders_rate'), 'senders', 'rate_per_second > 0 AND rate_per_second <= 10000'
    )
    op.add_column('messages', sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        'messages',
        sa.Column('resubmissions', sa.SmallInteger(), server_default=sa.text('0'), nullable=False),
    )
    # Messages left `sending` before this revision get reconciled like any stale claim.
    op.execute("UPDATE messages SET claimed_at = updated_at WHERE status = 'sending'")
    op.create_index(
        'ix_messages_sending_claimed',
        'messages',
        ['claimed_at'],
        unique=False,
        postgresql_where=sa.text("status = 'sending'"),
    )


def downgrade() -> None:
    op.drop_index(
        'ix_messages_sending_claimed',
        table_name='messages',
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.drop_column('messages', 'resubmissions')
    op.drop_column('messages', 'claimed_at')
    op.drop_constraint(op.f('ck_senders_rate'), 'senders', type_='check')
    op.drop_constraint(op.f('ck_senders_fallback_provider'), 'senders', type_='check')
    op.drop_column('senders', 'rate_per_second')
    op.drop_column('senders', 'fallback_provider')
