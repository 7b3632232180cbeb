"""Months of traffic (issue 13): the current opt-out state per scope beside its history
(backfilled from it), indexes for the lists (`?to=`, event endpoints), and what retention needs
(a body-redaction mark on messages; BRIN indexes on the creation time of what it prunes).

Revision ID: months_of_traffic
Revises: twilio_compat
Create Date: 2026-12-04 21:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'months_of_traffic'
down_revision: str | None = 'twilio_compat'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BRIN = (
    ('message_events', 'ix_message_events_created_brin'),
    ('inbound_parts', 'ix_inbound_parts_created_brin'),
    ('webhook_attempts', 'ix_webhook_attempts_created_brin'),
    ('webhook_events', 'ix_webhook_events_created_brin'),
    ('opt_outs', 'ix_opt_outs_created_brin'),
)


def upgrade() -> None:
    op.create_table(
        'opt_out_states',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('phone', sa.String(length=16), nullable=False),
        sa.Column('sender_id', postgresql.UUID(), nullable=True),
        sa.Column('action', sa.String(length=8), nullable=False),
        sa.Column('history_id', sa.BigInteger(), nullable=False),
        sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('opt_out', 'opt_in')", name=op.f('ck_opt_out_states_action')),
        sa.ForeignKeyConstraint(
            ['sender_id'], ['senders.id'], name=op.f('fk_opt_out_states_sender_id_senders')
        ),
        sa.ForeignKeyConstraint(
            ['history_id'], ['opt_outs.id'], name=op.f('fk_opt_out_states_history_id_opt_outs')
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_opt_out_states')),
        sa.UniqueConstraint('history_id', name=op.f('uq_opt_out_states_history_id')),
    )
    # Each insert into the history moves its scopes' states to the newest row of each (the rule
    # of app.consent.optouts: the newest row decides), in the inserting statement's transaction.
    op.execute(
        """
        CREATE FUNCTION opt_outs_move_states() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO opt_out_states AS state (phone, sender_id, action, history_id, changed_at)
            SELECT DISTINCT ON (phone, sender_id) phone, sender_id, action, id, created_at
            FROM added ORDER BY phone, sender_id, created_at DESC, id DESC
            ON CONFLICT (phone, sender_id) DO UPDATE
            SET action = excluded.action, history_id = excluded.history_id,
                changed_at = excluded.changed_at
            WHERE (excluded.changed_at, excluded.history_id)
                > (state.changed_at, state.history_id);
            RETURN NULL;
        END
        $$
        """
    )
    # Backfill: the newest row of each scope. Opt-out writes wait until this migration commits
    # (SHARE ROW EXCLUSIVE lets reads through): one committed between the backfill and the
    # trigger below would otherwise be missing from the current state for good.
    op.execute("LOCK TABLE opt_outs IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        """
        INSERT INTO opt_out_states (phone, sender_id, action, history_id, changed_at)
        SELECT DISTINCT ON (phone, sender_id) phone, sender_id, action, id, created_at
        FROM opt_outs
        ORDER BY phone, sender_id, created_at DESC, id DESC
        """
    )
    op.create_index(
        'uq_opt_out_states_phone_sender', 'opt_out_states', ['phone', 'sender_id'],
        unique=True, postgresql_nulls_not_distinct=True,
    )
    op.execute(
        "CREATE TRIGGER opt_outs_move_states AFTER INSERT ON opt_outs "
        "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION opt_outs_move_states()"
    )
    op.create_index(
        'ix_opt_out_states_opted_out', 'opt_out_states', ['changed_at', 'history_id'],
        postgresql_where=sa.text("action = 'opt_out'"),
    )
    op.create_index(
        'ix_opt_out_states_sender_opted_out', 'opt_out_states',
        ['sender_id', 'changed_at', 'history_id'], postgresql_where=sa.text("action = 'opt_out'"),
    )
    op.add_column(
        'messages', sa.Column('body_redacted_at', sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        'ix_messages_client_to_created', 'messages', ['client_id', 'to', 'created_at', 'id']
    )
    op.create_index(
        'ix_messages_body_kept', 'messages', ['created_at'],
        postgresql_where=sa.text('body_redacted_at IS NULL'),
    )
    op.create_index(
        'ix_webhook_endpoints_client_created', 'webhook_endpoints',
        ['client_id', 'created_at', 'id'],
    )
    for table, name in _BRIN:
        op.create_index(name, table, ['created_at'], postgresql_using='brin')
    op.create_index('ix_webhook_events_endpoint', 'webhook_events', ['endpoint_id'])


def downgrade() -> None:
    op.drop_index('ix_webhook_events_endpoint', table_name='webhook_events')
    for table, name in _BRIN:
        op.drop_index(name, table_name=table)
    op.drop_index('ix_webhook_endpoints_client_created', table_name='webhook_endpoints')
    op.drop_index('ix_messages_body_kept', table_name='messages')
    op.drop_index('ix_messages_client_to_created', table_name='messages')
    op.drop_column('messages', 'body_redacted_at')
    op.execute("DROP TRIGGER opt_outs_move_states ON opt_outs")
    op.execute("DROP FUNCTION opt_outs_move_states()")
    op.drop_table('opt_out_states')
