"""Events out: endpoints (a client's or a sender's), signing secrets, the events outbox and its
delivery attempts. New tables only; nothing existing changes.

Revision ID: 6c1d0e5f9a47
Revises: 2246f3dbd500
Create Date: 2026-11-26 04:29:10.650460
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '6c1d0e5f9a47'
down_revision: str | None = '2246f3dbd500'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('signing_secrets',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('client_id', sa.UUID(), nullable=True),
    sa.Column('sender_id', sa.UUID(), nullable=True),
    sa.Column('secret', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('(client_id IS NULL) <> (sender_id IS NULL)', name=op.f('ck_signing_secrets_one_owner')),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_signing_secrets_client_id_clients'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sender_id'], ['senders.id'], name=op.f('fk_signing_secrets_sender_id_senders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_signing_secrets'))
    )
    op.create_index(op.f('ix_signing_secrets_client_id'), 'signing_secrets', ['client_id'], unique=False)
    op.create_index(op.f('ix_signing_secrets_sender_id'), 'signing_secrets', ['sender_id'], unique=False)
    op.create_table('webhook_endpoints',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('client_id', sa.UUID(), nullable=True),
    sa.Column('sender_id', sa.UUID(), nullable=True),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('is_default', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('(client_id IS NULL) <> (sender_id IS NULL)', name=op.f('ck_webhook_endpoints_one_owner')),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_webhook_endpoints_client_id_clients'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sender_id'], ['senders.id'], name=op.f('fk_webhook_endpoints_sender_id_senders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_index('uq_webhook_endpoints_client_default', 'webhook_endpoints', ['client_id'], unique=True, postgresql_where=sa.text('is_default AND client_id IS NOT NULL'))
    op.create_index('uq_webhook_endpoints_client_url', 'webhook_endpoints', ['client_id', 'url'], unique=True, postgresql_where=sa.text('client_id IS NOT NULL'))
    op.create_index('uq_webhook_endpoints_sender_default', 'webhook_endpoints', ['sender_id'], unique=True, postgresql_where=sa.text('is_default AND sender_id IS NOT NULL'))
    op.create_index('uq_webhook_endpoints_sender_url', 'webhook_endpoints', ['sender_id', 'url'], unique=True, postgresql_where=sa.text('sender_id IS NOT NULL'))
    op.create_table('webhook_events',
    sa.Column('seq', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('client_id', sa.UUID(), nullable=True),
    sa.Column('endpoint_id', sa.UUID(), nullable=False),
    sa.Column('message_id', sa.UUID(), nullable=True),
    sa.Column('ordering_key', sa.String(length=80), nullable=True),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=16), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('in_flight_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('retry_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f('ck_webhook_events_status')),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_webhook_events_client_id_clients'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'], name=op.f('fk_webhook_events_endpoint_id_webhook_endpoints'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_webhook_events_message_id_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_webhook_events')),
    sa.UniqueConstraint('id', name=op.f('uq_webhook_events_id'))
    )
    op.create_index('ix_webhook_events_client_created', 'webhook_events', ['client_id', 'created_at', 'seq'], unique=False)
    op.create_index('ix_webhook_events_in_flight', 'webhook_events', ['endpoint_id'], unique=False, postgresql_where=sa.text('in_flight_until IS NOT NULL'))
    op.create_index(op.f('ix_webhook_events_message_id'), 'webhook_events', ['message_id'], unique=False)
    op.create_index('ix_webhook_events_pending_due', 'webhook_events', ['next_attempt_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_webhook_events_pending_line', 'webhook_events', ['endpoint_id', 'ordering_key', 'seq'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_table('webhook_attempts',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('address', sa.String(length=45), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_code', sa.String(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('response_status', sa.SmallInteger(), nullable=True),
    sa.Column('response_body', sa.Text(), nullable=True),
    sa.Column('latency_ms', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('succeeded', 'failed')", name=op.f('ck_webhook_attempts_status')),
    sa.ForeignKeyConstraint(['event_id'], ['webhook_events.id'], name=op.f('fk_webhook_attempts_event_id_webhook_events'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_attempts'))
    )
    op.create_index(op.f('ix_webhook_attempts_event_id'), 'webhook_attempts', ['event_id'], unique=False)


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints; dependents first.
    op.drop_table('webhook_attempts')
    op.drop_table('webhook_events')
    op.drop_table('webhook_endpoints')
    op.drop_table('signing_secrets')
