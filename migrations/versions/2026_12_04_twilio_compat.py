"""The Twilio-compatible API: per-client Twilio credentials (the auth token encrypted with
SECRETS_KEY), which API accepted a message, and the format of an event (Twilio's status
callbacks are form-encoded and signed with X-Twilio-Signature).

Revision ID: twilio_compat
Revises: 7e3a9c41b2d8
Create Date: 2026-12-04 21:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'twilio_compat'
down_revision: str | None = '7e3a9c41b2d8'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'twilio_credentials',
        sa.Column('client_id', postgresql.UUID(), nullable=False),
        sa.Column('auth_token', sa.String(length=200), nullable=False),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ['client_id'], ['clients.id'], name=op.f('fk_twilio_credentials_client_id_clients'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('client_id', name=op.f('pk_twilio_credentials')),
    )
    # Constant defaults: no table rewrite, whatever the table's size.
    op.add_column(
        'messages',
        sa.Column('api', sa.String(length=8), server_default=sa.text("'v1'"), nullable=False),
    )
    op.create_check_constraint(op.f('ck_messages_api'), 'messages', "api IN ('v1', 'twilio')")
    op.add_column(
        'webhook_events',
        sa.Column(
            'format', sa.String(length=8), server_default=sa.text("'standard'"), nullable=False
        ),
    )
    op.create_check_constraint(
        op.f('ck_webhook_events_format'), 'webhook_events', "format IN ('standard', 'twilio')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_webhook_events_format'), 'webhook_events', type_='check')
    op.drop_column('webhook_events', 'format')
    op.drop_constraint(op.f('ck_messages_api'), 'messages', type_='check')
    op.drop_column('messages', 'api')
    op.drop_table('twilio_credentials')
