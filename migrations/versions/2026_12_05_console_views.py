"""The operator console's lists: a BRIN index on messages' `created_at` (the overview's last 24
hours), the failed events newest first, and the disabled event endpoints.

BRIN costs next to nothing on insert (messages arrive in `created_at` order) and reads the
window's block ranges only. The two partial indexes hold rare rows (failed events, disabled
endpoints). Built without CONCURRENTLY (the migrations run in one transaction): the BRIN index
reads `messages` once while holding its writes, the failed-events one `webhook_events` (README,
"Known limits").

Revision ID: console_views
Revises: console_sessions
Create Date: 2026-12-05 03:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "console_views"
down_revision: str | None = "console_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_messages_created_brin",
        "messages",
        ["created_at"],
        unique=False,
        postgresql_using="brin",
    )
    op.create_index(
        "ix_webhook_events_failed",
        "webhook_events",
        ["created_at", "seq"],
        unique=False,
        postgresql_where=sa.text("status = 'failed'"),
    )
    op.create_index(
        "ix_webhook_endpoints_disabled",
        "webhook_endpoints",
        ["disabled_at"],
        unique=False,
        postgresql_where=sa.text("disabled_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_webhook_endpoints_disabled",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("disabled_at IS NOT NULL"),
    )
    op.drop_index(
        "ix_webhook_events_failed",
        table_name="webhook_events",
        postgresql_where=sa.text("status = 'failed'"),
    )
    op.drop_index("ix_messages_created_brin", table_name="messages", postgresql_using="brin")
