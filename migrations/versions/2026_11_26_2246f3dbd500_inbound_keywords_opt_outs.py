"""Inbound messages (and parts of long ones), sender keyword sets, opt-out actors, and the
service's own messages (keyword replies, which belong to no client).

Revision ID: 2246f3dbd500
Revises: 95e0c050828e
Create Date: 2026-11-26 04:02:27.062911
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '2246f3dbd500'
down_revision: str | None = '95e0c050828e'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Existing senders get the built-in keyword sets, without replies: they must be configured (or
# the defaults accepted) before those senders can send again.
BUILTIN_KEYWORDS = (
    '{"opt_out": {"keywords": {"en": ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", '
    '"QUIT", "REVOKE", "OPTOUT"], "fr": ["ARRET", "ARRETE", "DESABONNER"]}, "replies": {}}, '
    '"opt_in": {"keywords": {"en": ["START", "YES", "UNSTOP"]}, "replies": {}}, '
    '"help": {"keywords": {"en": ["HELP", "INFO"], "fr": ["AIDE"]}, "replies": {}}, '
    '"custom": []}'
)


def upgrade() -> None:
    op.create_table('inbound_messages',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('provider', sa.String(length=20), nullable=False),
    sa.Column('provider_message_id', sa.String(length=128), nullable=False),
    sa.Column('sender_id', sa.UUID(), nullable=True),
    sa.Column('to', sa.String(length=32), nullable=False),
    sa.Column('from', sa.String(length=32), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('num_segments', sa.SmallInteger(), nullable=True),
    sa.Column('keyword', sa.String(length=64), nullable=True),
    sa.Column('keyword_category', sa.String(length=16), nullable=True),
    sa.Column('language', sa.String(length=2), nullable=True),
    sa.Column('reply_message_id', sa.UUID(), nullable=True),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['reply_message_id'], ['messages.id'], name=op.f('fk_inbound_messages_reply_message_id_messages')),
    sa.ForeignKeyConstraint(['sender_id'], ['senders.id'], name=op.f('fk_inbound_messages_sender_id_senders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbound_messages')),
    sa.UniqueConstraint('provider', 'provider_message_id', name='uq_inbound_provider_message')
    )
    op.create_index('ix_inbound_created', 'inbound_messages', ['created_at', 'id'], unique=False)
    op.create_index('ix_inbound_from_created', 'inbound_messages', ['from', 'created_at'], unique=False)
    op.create_table('inbound_parts',
    sa.Column('provider', sa.String(length=20), nullable=False),
    sa.Column('provider_message_id', sa.String(length=128), nullable=False),
    sa.Column('from', sa.String(length=32), nullable=False),
    sa.Column('to', sa.String(length=32), nullable=False),
    sa.Column('reference', sa.String(length=64), nullable=False),
    sa.Column('number', sa.SmallInteger(), nullable=False),
    sa.Column('total', sa.SmallInteger(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('inbound_message_id', sa.UUID(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['inbound_message_id'], ['inbound_messages.id'], name=op.f('fk_inbound_parts_inbound_message_id_inbound_messages')),
    sa.PrimaryKeyConstraint('provider', 'provider_message_id', name=op.f('pk_inbound_parts'))
    )
    op.create_index('ix_inbound_parts_pending', 'inbound_parts', ['provider', 'from', 'to', 'reference'], unique=False, postgresql_where=sa.text('inbound_message_id IS NULL'))
    op.add_column('messages', sa.Column('kind', sa.String(length=24), server_default=sa.text("'regular'"), nullable=False))
    op.alter_column('messages', 'client_id',
               existing_type=sa.UUID(),
               nullable=True)
    op.add_column('opt_outs', sa.Column('actor', sa.String(length=240), nullable=True))
    # A provider repeating an id must never stop us recording that a message was sent.
    op.drop_constraint('uq_messages_provider_message', 'messages', type_='unique')
    op.create_index(
        'ix_messages_provider_message', 'messages', ['provider', 'provider_message_id']
    )
    op.add_column(
        'senders',
        sa.Column(
            'keywords', postgresql.JSONB(astext_type=sa.Text()), nullable=False,
            server_default=sa.text(f"'{BUILTIN_KEYWORDS}'::jsonb"),
        ),
    )
    op.alter_column('senders', 'keywords', server_default=None)


def downgrade() -> None:
    op.drop_column('senders', 'keywords')
    op.drop_column('opt_outs', 'actor')
    op.drop_index('ix_messages_provider_message', table_name='messages')
    op.create_unique_constraint(
        'uq_messages_provider_message', 'messages', ['provider', 'provider_message_id']
    )
    # The service's own messages have no client, which the old schema cannot hold.
    op.execute("UPDATE inbound_messages SET reply_message_id = NULL")
    op.execute("DELETE FROM messages WHERE client_id IS NULL")
    op.alter_column('messages', 'client_id',
               existing_type=sa.UUID(),
               nullable=False)
    op.drop_column('messages', 'kind')
    op.drop_index('ix_inbound_from_created', table_name='inbound_messages')
    op.drop_index('ix_inbound_created', table_name='inbound_messages')
    op.drop_index('ix_inbound_parts_pending', table_name='inbound_parts', postgresql_where=sa.text('inbound_message_id IS NULL'))
    op.drop_table('inbound_parts')
    op.drop_table('inbound_messages')
