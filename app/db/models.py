"""Tables. The migrations in `migrations/versions` create exactly these (a test checks)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


class Client(Base):
    """A backend service that sends through us; it sees only its own messages."""

    __tablename__ = "clients"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    default_sender_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("senders.id", ondelete="SET NULL")
    )
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
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()


class Sender(Base):
    """An address we send from (long code, short code, alphanumeric ID), bound to one provider."""

    __tablename__ = "senders"
    __table_args__ = (
        CheckConstraint("kind IN ('long_code', 'short_code', 'alphanumeric')", name="kind"),
        CheckConstraint("provider IN ('twilio', 'vonage', 'fake')", name="provider"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, default=uuid.uuid4)
    address: Mapped[str] = mapped_column(String(20), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(20))
    description: Mapped[str | None] = mapped_column(String(200))
    # The sender's keyword sets and replies: an `app.domain.keywords.KeywordConfig` as JSON.
    keywords: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class Message(Base):
    """One outbound SMS. Its `status` only moves forward (see `app.domain.status`)."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_client_created", "client_id", "created_at", "id"),
        # The sweep looks for queued messages whose next attempt is due.
        Index(
            "ix_messages_queued_due", "next_attempt_at", postgresql_where=text("status = 'queued'")
        ),
        # Not unique: a provider reusing or repeating an id must never stop us from recording
        # that a message was sent. Callbacks find messages by our own id first.
        Index("ix_messages_provider_message", "provider", "provider_message_id"),
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
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now()
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _updated()


class MessageEvent(Base):
    """Everything that happened to a message, including reports that changed nothing."""

    __tablename__ = "message_events"

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


class OptOut(Base):
    """Opt-out history: the newest row for (phone, sender) is the current state; rows are never
    deleted. A row with no sender applies to every sender."""

    __tablename__ = "opt_outs"
    __table_args__ = (
        Index("ix_opt_outs_phone_sender_created", "phone", "sender_id", "created_at"),
        CheckConstraint("action IN ('opt_out', 'opt_in')", name="action"),
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
