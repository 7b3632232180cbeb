"""Tables. The migrations in `migrations/versions` create exactly these (a test checks)."""

from __future__ import annotations

import uuid
from datetime import datetime, time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    Time,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.kernel.secrets import EncryptedSecret
from app.kernel.sender_rates import default_rate

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints predictably."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


def _updated() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


def _default_sender_rate(context: DefaultExecutionContext) -> float:
    """The rate of a sender inserted without one: what its kind allows by default."""
    parameters: dict[str, Any] = context.get_current_parameters()  # type: ignore[no-untyped-call]
    return default_rate(str(parameters["kind"]), str(parameters["address"]))


class Client(Base):
    """A backend service that sends through us; it sees only its own messages."""

    __tablename__ = "clients"
    __table_args__ = (
        CheckConstraint(
            "(quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)", name="quiet_hours"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    default_sender_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="SET NULL")
    )
    # The client's own SMS pumping alarm settings (`action`, `min_distinct`,
    # `baseline_multiple`), set by an admin; null: the service's (app.traffic.velocity).
    pumping: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Quiet hours (app.kernel.quiet_hours), set by an admin: the recipient's local times between
    # which a message sent with `respect_quiet_hours` waits; both or neither.
    quiet_hours_start: Mapped[time | None] = mapped_column(Time)
    quiet_hours_end: Mapped[time | None] = mapped_column(Time)
    created_at: Mapped[datetime] = _now()


class ClientTraffic(Base):
    """An admin's traffic rules for one client (app.traffic): a narrower list of destination
    countries, and its own limits. A null field means "the service's default" (TRAFFIC__*); a
    limit of 0 means unlimited. No row: every default."""

    __tablename__ = "client_traffic"

    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    permitted_countries: Mapped[list[str] | None] = mapped_column(ARRAY(String(2)))
    messages_per_minute: Mapped[int | None] = mapped_column(Integer)
    segments_per_minute: Mapped[int | None] = mapped_column(Integer)
    messages_per_day: Mapped[int | None] = mapped_column(Integer)
    segments_per_day: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = _updated()


class TwilioCredential(Base):
    """A client's Twilio-style credentials for the Twilio-compatible API (app.twilio_api.routes):
    the account SID is derived from the client's id, the auth token is random. The token signs
    the status callbacks the client asked for (`X-Twilio-Signature`), so it cannot be hashed: it
    is encrypted with SECRETS_KEY like signing secrets. One per client; issuing again replaces it.
    Lives as long as its client."""

    __tablename__ = "twilio_credentials"

    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    auth_token: Mapped[str] = mapped_column(EncryptedSecret())
    created_at: Mapped[datetime] = _now()


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret (keys are random, so no slow hash needed)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    # The first characters of the key, shown in listings so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # What the key is for ("billing backend"), shown in listings; keys made before it had none.
    name: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The key stops working then (set by a rotation's overlap, or when it was made).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Written at most once a minute per key, when an API process loads the key into its cache
    # (`app.access.lookups`), never by the request itself: accurate to about a minute.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()


class Sender(Base):
    """An address we send from (long code, short code, alphanumeric ID), bound to one provider."""

    __tablename__ = "senders"
    __table_args__ = (
        CheckConstraint("kind IN ('long_code', 'short_code', 'alphanumeric')", name="kind"),
        # Provider names are not listed here: they come from app.providers.registry, checked
        # by the senders' domain code (README, "Adding a provider").
        CheckConstraint("fallback_provider <> provider", name="fallback_provider"),
        CheckConstraint("rate_per_second > 0 AND rate_per_second <= 10000", name="rate"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    address: Mapped[str] = mapped_column(String(20), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(20))
    # Where its messages go while `provider`'s circuit is open (app.delivery.circuit).
    fallback_provider: Mapped[str | None] = mapped_column(String(20))
    # Submissions per second, across every worker (app.delivery.pacing); defaults by kind.
    rate_per_second: Mapped[float] = mapped_column(Float, default=_default_sender_rate)
    description: Mapped[str | None] = mapped_column(String(200))
    # The sender's keyword sets and replies: an `app.senders.keywords.KeywordConfig` as JSON.
    keywords: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # The destination countries (ISO 3166-1 alpha-2) it serves when a sender is picked from a
    # client's pool (app.traffic.pools); None: its kind's default (a long code its own country).
    countries: Mapped[list[str] | None] = mapped_column(ARRAY(String(2)))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class SenderAffinity(Base):
    """The sender a client's pool picked for a recipient (app.traffic.pools): kept, so replies
    and STOP land on the number that wrote to them. Pruned when unused (README, "Retention")."""

    __tablename__ = "sender_affinity"

    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    recipient: Mapped[str] = mapped_column(String(16), primary_key=True)
    sender_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="CASCADE"), index=True
    )
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SenderClient(Base):
    """A sender granted to a client: the client may send from it, name it in opt-outs and read
    its inbound messages. A sender may be granted to several clients."""

    __tablename__ = "sender_clients"

    sender_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="CASCADE"), primary_key=True
    )
    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = _now()


class Message(Base):
    """One outbound SMS. Its `status` only moves forward (see `app.kernel.status`)."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_client_created", "client_id", "created_at", "id"),
        # GET /v1/messages?to=: one client's messages to one number, newest first.
        Index("ix_messages_client_to_created", "client_id", "to", "created_at", "id"),
        # Retention finds the oldest messages whose bodies are still stored.
        Index(
            "ix_messages_body_kept", "created_at", postgresql_where=text("body_redacted_at IS NULL")
        ),
        # The sweep looks for queued messages whose next attempt is due.
        Index(
            "ix_messages_queued_due", "next_attempt_at", postgresql_where=text("status = 'queued'")
        ),
        # The scheduler promotes `scheduled` messages whose `send_at` has come (app.traffic).
        Index(
            "ix_messages_scheduled_due", "send_at", postgresql_where=text("status = 'scheduled'")
        ),
        # Not unique: a provider reusing or repeating an id must never stop us from recording
        # that a message was sent. Callbacks find messages by our own id first.
        Index("ix_messages_provider_message", "provider", "provider_message_id"),
        # Reconciliation looks for claims older than a provider call can last.
        Index(
            "ix_messages_sending_claimed",
            "claimed_at",
            postgresql_where=text("status = 'sending'"),
        ),
        CheckConstraint("api IN ('v1', 'twilio')", name="api"),
        # An admin releases or cancels a client's held messages (the pumping alarm), oldest first.
        Index(
            "ix_messages_held",
            "client_id",
            "created_at",
            postgresql_where=text("status = 'held'"),
        ),
        # The status-check sweep: `sent` messages never checked (due `STATUS_CHECK_AFTER_SECONDS`
        # after their last news) or whose next check is due (app.delivery.reconcile).
        Index(
            "ix_messages_sent_check",
            "next_check_at",
            "updated_at",
            postgresql_where=text("status = 'sent'"),
        ),
        # The console's overview reads the last 24 hours (app.console.overview): BRIN, since
        # messages arrive in this order and the send path must not pay for a B-tree.
        Index("ix_messages_created_brin", "created_at", postgresql_using="brin"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    # None for the service's own messages (keyword replies), which belong to no client.
    client_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("clients.id"))
    sender_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("senders.id"))
    # regular, or a keyword reply: opt_out_confirmation, opt_in_confirmation, help_reply,
    # keyword_reply. The first two kinds of reply pass the opt-out check (see domain.delivery).
    kind: Mapped[str] = mapped_column(
        String(24), default="regular", server_default=text("'regular'")
    )
    to: Mapped[str] = mapped_column(String(16))
    from_: Mapped[str] = mapped_column("from", String(20))
    body: Mapped[str] = mapped_column(Text)
    encoding: Mapped[str] = mapped_column(String(8))
    segments: Mapped[int] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    provider: Mapped[str] = mapped_column(String(20))
    provider_message_id: Mapped[str | None] = mapped_column(String(64))
    callback_url: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    validity_period: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a scheduled message is to leave (the client's `send_at`, or the end of quiet hours);
    # None for a message sent at once.
    send_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now()
    # When the current (or last) attempt claimed it: a `sending` message whose claim is older
    # than a provider call can last is reconciled with the provider (app.delivery.reconcile).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Submissions made again because an earlier one's outcome was unknown and the provider had
    # no record of it (each is also an attempt). Such a message never fails over.
    resubmissions: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    # The API that accepted it: `v1`, or `twilio` (its status callbacks go out in Twilio's form).
    api: Mapped[str] = mapped_column(String(8), default="v1", server_default=text("'v1'"))
    # Set when retention replaced the body with "" (`RETENTION__MESSAGE_BODY_DAYS`).
    body_redacted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A `sent` message's next status check at its provider (None: never checked yet, due
    # `STATUS_CHECK_AFTER_SECONDS` after its last news; 'infinity': checks stopped), how many
    # were made, and why the service stopped looking after its status (shown in the API).
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status_checks: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    status_detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class MessageEvent(Base):
    """Everything that happened to a message, including reports that changed nothing."""

    __tablename__ = "message_events"
    __table_args__ = (
        # Retention deletes the oldest events (BRIN: tiny, and rows arrive in time order).
        Index("ix_message_events_created_brin", "created_at", postgresql_using="brin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    # The status the message moved to, or the reported one when `applied` is false.
    status: Mapped[str | None] = mapped_column(String(16))
    applied: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(20))  # api, worker, sweep, twilio, vonage, fake
    provider_status: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class MessagePart(Base):
    """One part of a long message whose provider reports on each part (Vonage's receipts).

    Written when the provider accepts the message (number, total and the part's id) and by each
    receipt for the part (its status, forward only); the message settles from all its parts
    (`app.delivery.parts`). Rows live as long as their message and are deleted with it.
    """

    __tablename__ = "message_parts"
    __table_args__ = (
        # A receipt without our id (client-ref) is matched on its part's id.
        Index("ix_message_parts_provider_message", "provider_message_id"),
    )

    message_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    provider_message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # 1-based place and part count, from the provider's answer; None until it is recorded (a
    # receipt may arrive before the worker records the acceptance).
    number: Mapped[int | None] = mapped_column(SmallInteger)
    total: Mapped[int | None] = mapped_column(SmallInteger)
    # This part's status in our vocabulary (None: accepted, nothing reported yet).
    status: Mapped[str | None] = mapped_column(String(16))
    provider_status: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class OptOut(Base):
    """Opt-out history: the newest row for (phone, sender) is the current state (copied to
    `opt_out_states`); rows are kept unless RETENTION__OPT_OUT_HISTORY_DAYS is set, and the row
    deciding a scope always. A row with no sender applies to every sender."""

    __tablename__ = "opt_outs"
    __table_args__ = (
        Index("ix_opt_outs_phone_sender_created", "phone", "sender_id", "created_at"),
        CheckConstraint("action IN ('opt_out', 'opt_in')", name="action"),
        # Retention (when RETENTION__OPT_OUT_HISTORY_DAYS is set) finds the oldest rows.
        Index("ix_opt_outs_created_brin", "created_at", postgresql_using="brin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(16))
    sender_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("senders.id"))
    action: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(32))  # keyword, api, import, provider_error
    # Who: "recipient" for keywords, "client:<name>" for the API, "provider:<name>" for errors.
    actor: Mapped[str | None] = mapped_column(String(240))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


class OptOutState(Base):
    """The current state of one scope (a number and a sender, or a number service-wide): its
    newest history row. Kept by a trigger on `opt_outs` (`opt_outs_move_states`, written in the
    migration `months_of_traffic`) in the statement of each history insert, whoever writes it.
    Lists read it instead of ranking the whole history; the history row it points at is never
    pruned (the foreign key refuses it)."""

    __tablename__ = "opt_out_states"
    __table_args__ = (
        # One row per scope; a service-wide scope has no sender (NULL counts as one value).
        Index(
            "uq_opt_out_states_phone_sender",
            "phone",
            "sender_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
        # GET /v1/opt-outs: the opted-out scopes, newest first, all or of one sender.
        Index(
            "ix_opt_out_states_opted_out",
            "changed_at",
            "history_id",
            postgresql_where=text("action = 'opt_out'"),
        ),
        Index(
            "ix_opt_out_states_sender_opted_out",
            "sender_id",
            "changed_at",
            "history_id",
            postgresql_where=text("action = 'opt_out'"),
        ),
        CheckConstraint("action IN ('opt_out', 'opt_in')", name="action"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(16))
    sender_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("senders.id"))
    action: Mapped[str] = mapped_column(String(8))
    # The deciding history row, and its created_at (the list's order and cursor).
    history_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("opt_outs.id"), unique=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """A client's Idempotency-Key and the response its first request produced."""

    __tablename__ = "idempotency_keys"

    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    response_status: Mapped[int] = mapped_column(SmallInteger)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False, index=True
    )


class InboundMessage(Base):
    """A message a customer sent to one of our addresses (stored once per provider message)."""

    __tablename__ = "inbound_messages"
    __table_args__ = (
        UniqueConstraint("provider", "provider_message_id", name="uq_inbound_provider_message"),
        Index("ix_inbound_created", "created_at", "id"),
        Index("ix_inbound_from_created", "from", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    provider: Mapped[str] = mapped_column(String(20))
    provider_message_id: Mapped[str] = mapped_column(String(128))
    # None when the message was sent to an address that is not one of our senders.
    sender_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("senders.id"))
    to: Mapped[str] = mapped_column(String(32))
    from_: Mapped[str] = mapped_column("from", String(32))
    body: Mapped[str] = mapped_column(Text)
    num_segments: Mapped[int | None] = mapped_column(SmallInteger)
    keyword: Mapped[str | None] = mapped_column(String(64))
    keyword_category: Mapped[str | None] = mapped_column(String(16))
    language: Mapped[str | None] = mapped_column(String(2))
    reply_message_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("messages.id"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class InboundPart(Base):
    """One part of a long inbound message that the provider delivers part by part.

    Parts are grouped by (provider, from, to, reference) among those not yet assembled: a
    handset's reference counter wraps around, so an old, assembled group must not absorb a new
    message's parts.
    """

    __tablename__ = "inbound_parts"
    __table_args__ = (
        Index(
            "ix_inbound_parts_pending",
            "provider",
            "from",
            "to",
            "reference",
            postgresql_where=text("inbound_message_id IS NULL"),
        ),
        Index("ix_inbound_parts_created_brin", "created_at", postgresql_using="brin"),
    )

    provider: Mapped[str] = mapped_column(String(20), primary_key=True)
    provider_message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    from_: Mapped[str] = mapped_column("from", String(32))
    to: Mapped[str] = mapped_column(String(32))
    reference: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(SmallInteger)
    total: Mapped[int] = mapped_column(SmallInteger)
    body: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # Set once the whole message is stored; such parts never join a new group.
    inbound_message_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("inbound_messages.id")
    )
    created_at: Mapped[datetime] = _now()


class WebhookEndpoint(Base):
    """A URL events are sent to, owned by a client (its default endpoint, or a message's
    `callback_url`) or by a sender (its inbound messages and opt-out changes). The owner's
    signing secrets sign what it receives; a 410 answer disables it until it is enabled again."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("(client_id IS NULL) <> (sender_id IS NULL)", name="one_owner"),
        Index(
            "uq_webhook_endpoints_client_url",
            "client_id",
            "url",
            unique=True,
            postgresql_where=text("client_id IS NOT NULL"),
        ),
        Index(
            "uq_webhook_endpoints_sender_url",
            "sender_id",
            "url",
            unique=True,
            postgresql_where=text("sender_id IS NOT NULL"),
        ),
        # At most one default endpoint per owner.
        Index(
            "uq_webhook_endpoints_client_default",
            "client_id",
            unique=True,
            postgresql_where=text("is_default AND client_id IS NOT NULL"),
        ),
        Index(
            "uq_webhook_endpoints_sender_default",
            "sender_id",
            unique=True,
            postgresql_where=text("is_default AND sender_id IS NOT NULL"),
        ),
        # GET /v1/event-endpoints, by cursor.
        Index("ix_webhook_endpoints_client_created", "client_id", "created_at", "id"),
        # The console's failing endpoints (app.console.events_view).
        Index(
            "ix_webhook_endpoints_disabled",
            "disabled_at",
            postgresql_where=text("disabled_at IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE")
    )
    sender_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="CASCADE")
    )
    url: Mapped[str] = mapped_column(Text)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class SigningSecret(Base):
    """A Standard Webhooks signing secret (`whsec_` + base64) of a client or a sender. Every
    secret not yet expired signs each attempt, so a rotation keeps the old one valid a while."""

    __tablename__ = "signing_secrets"
    __table_args__ = (
        CheckConstraint("(client_id IS NULL) <> (sender_id IS NULL)", name="one_owner"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    client_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE"), index=True
    )
    sender_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="CASCADE"), index=True
    )
    # Signing needs the key itself, so it cannot be hashed: it is encrypted with SECRETS_KEY
    # (app.kernel.secrets), so that a dump of the database alone cannot sign our webhooks.
    secret: Mapped[str] = mapped_column(EncryptedSecret())
    created_at: Mapped[datetime] = _now()
    # None while it is the current secret; set when a rotation retires it.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookEvent(Base):
    """One event for one endpoint (the outbox): written in the transaction that made the change,
    delivered by the events worker after commit, at least once."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        CheckConstraint("format IN ('standard', 'twilio')", name="format"),
        Index("ix_webhook_events_client_created", "client_id", "created_at", "seq"),
        # The sweep looks for pending events that are due.
        Index(
            "ix_webhook_events_pending_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # Ordering: is an earlier event of the same line still pending for this endpoint?
        Index(
            "ix_webhook_events_pending_line",
            "endpoint_id",
            "ordering_key",
            "seq",
            postgresql_where=text("status = 'pending'"),
        ),
        # The per-endpoint concurrency limit counts attempts in flight.
        Index(
            "ix_webhook_events_in_flight",
            "endpoint_id",
            postgresql_where=text("in_flight_until IS NOT NULL"),
        ),
        Index("ix_webhook_events_created_brin", "created_at", postgresql_using="brin"),
        # Retention deletes a callback URL's endpoint once no event uses it.
        Index("ix_webhook_events_endpoint", "endpoint_id"),
        # The console's failed events, newest first (app.console.events_view).
        Index(
            "ix_webhook_events_failed",
            "created_at",
            "seq",
            postgresql_where=text("status = 'failed'"),
        ),
    )

    # The order events were written in: a message's events are delivered in this order.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # The public id: `webhook-id`, and what receivers dedupe on.
    id: Mapped[uuid.UUID] = mapped_column(UUID, unique=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(32))
    # The client who may read the event; None for a sender's events (admin keys read those).
    client_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("clients.id", ondelete="CASCADE")
    )
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    message_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    # Events with the same key (a message, a number's opt-outs) go to an endpoint in order.
    ordering_key: Mapped[str | None] = mapped_column(String(80))
    # The body sent: {"id", "type", "timestamp", "data"}; for the `twilio` format, the form
    # fields of a Twilio status callback.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # `standard` (JSON, Standard Webhooks signature) or `twilio` (form, X-Twilio-Signature).
    format: Mapped[str] = mapped_column(
        String(8), default="standard", server_default=text("'standard'")
    )
    status: Mapped[str] = mapped_column(
        String(16), default="pending", server_default=text("'pending'")
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now()
    # Set while an attempt is in flight (a lease: a worker that died frees it when it passes).
    in_flight_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set at the first attempt (and again by a redelivery): retries stop after it.
    retry_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class WebhookAttempt(Base):
    """One HTTP attempt to deliver an event, whatever its outcome."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        CheckConstraint("status IN ('succeeded', 'failed')", name="status"),
        Index("ix_webhook_attempts_created_brin", "created_at", postgresql_using="brin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    # The address connected to (after the destination check), when it got that far.
    address: Mapped[str | None] = mapped_column(String(45))
    status: Mapped[str] = mapped_column(String(16))
    # timeout, connection_error, http_status, redirect, gone, destination_refused, …
    error_code: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    # The start of the response body (at most EVENTS__MAX_RESPONSE_BYTES).
    response_body: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()


class ConsoleSession(Base):
    """An operator's signed-in session of the console (app.console.sessions): the cookie holds
    the random token, this row its SHA-256. Ends at `expires_at`, at sign-out (deleted), or at
    the next request once its admin key is revoked or expired; the retention job deletes it."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    # Every form of the session carries it (a hidden field), checked against this.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    # Retention deletes the expired ones, oldest first.
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # Written at most once a minute per session.
    last_seen_at: Mapped[datetime] = _now()
