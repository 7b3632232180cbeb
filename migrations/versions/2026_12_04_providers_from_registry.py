"""Provider names come from the provider registry (app.providers.registry), not the schema: the
CHECK constraints listing 'twilio', 'vonage' and 'fake' on `senders.provider` and
`senders.fallback_provider` are dropped, so adding a provider needs no migration. The senders'
domain code and API refuse unregistered names; the database still refuses a fallback provider
equal to the provider.

Dropping a CHECK constraint takes a brief ACCESS EXCLUSIVE lock and no scan; the new fallback
constraint scans `senders` (a few rows). A downgrade fails while a sender names a provider
outside the old list.

Revision ID: providers_from_registry
Revises: status_check_schedule
Create Date: 2026-12-04 23:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = 'providers_from_registry'
down_revision: str | None = 'status_check_schedule'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f('ck_senders_provider'), 'senders', type_='check')
    op.drop_constraint(op.f('ck_senders_fallback_provider'), 'senders', type_='check')
    op.create_check_constraint(
        op.f('ck_senders_fallback_provider'), 'senders', 'fallback_provider <> provider'
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_senders_fallback_provider'), 'senders', type_='check')
    op.create_check_constraint(
        op.f('ck_senders_fallback_provider'),
        'senders',
        "fallback_provider IN ('twilio', 'vonage', 'fake') AND fallback_provider <> provider",
    )
    op.create_check_constraint(
        op.f('ck_senders_provider'), 'senders', "provider IN ('twilio', 'vonage', 'fake')"
    )
