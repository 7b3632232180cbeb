"""Traffic rules per client (app.traffic): a narrower list of destination countries and the
client's own message and segment limits per minute and per day, set by an admin.

A new, empty table (one row per client at most); nothing existing is rewritten.

Revision ID: client_traffic
Revises: providers_from_registry
Create Date: 2026-12-04 23:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'client_traffic'
down_revision: str | None = 'providers_from_registry'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'client_traffic',
        sa.Column('client_id', postgresql.UUID(), nullable=False),
        sa.Column('permitted_countries', postgresql.ARRAY(sa.String(length=2)), nullable=True),
        sa.Column('messages_per_minute', sa.Integer(), nullable=True),
        sa.Column('segments_per_minute', sa.Integer(), nullable=True),
        sa.Column('messages_per_day', sa.Integer(), nullable=True),
        sa.Column('segments_per_day', sa.Integer(), nullable=True),
        sa.Column(
            'updated_at',
            sa.DateTime(timezone=True),
            server_default=sa.text('now()'),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ['client_id'],
            ['clients.id'],
            name=op.f('fk_client_traffic_client_id_clients'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('client_id', name=op.f('pk_client_traffic')),
    )


def downgrade() -> None:
    op.drop_table('client_traffic')
