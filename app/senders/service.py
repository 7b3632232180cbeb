"""Senders: the addresses we send from, each bound to one provider."""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from enum import Enum, StrEnum
from typing import Final

import phonenumbers
from sqlalchemy import Select, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Client, Sender, SenderClient
from app.kernel.errors import Conflict, NotFound, ValidationFailed
from app.kernel.phone import InvalidPhoneNumber, normalize_phone
from app.kernel.sender_rates import default_rate
from app.providers.registry import PROVIDERS
from app.senders.keywords import KeywordConfig


class SenderKind(StrEnum):
    """What kind of address a sender is; it decides how the address is validated."""

    LONG_CODE = "long_code"
    SHORT_CODE = "short_code"
    ALPHANUMERIC = "alphanumeric"


class Unchanged(Enum):
    """Marks an update argument that was not given (where None means "remove")."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


PHONE_LIKE = re.compile(r"^\+?[0-9 ().-]+$")
_SHORT_CODE = re.compile(r"^[0-9]{3,8}$")
# GSM sender IDs: up to 11 characters, letters, digits and spaces, at least one letter.
_ALPHANUMERIC = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")


def normalize_sender_address(kind: SenderKind, address: str, default_region: str) -> str:
    """The canonical form of a sender address, or `ValidationFailed` naming `address`."""
    if kind is SenderKind.LONG_CODE:
        try:
            return normalize_phone(address, default_region)
        except InvalidPhoneNumber as error:
            raise ValidationFailed.for_field("invalid_sender", "address", str(error)) from None
    if kind is SenderKind.SHORT_CODE and not _SHORT_CODE.match(address):
        raise ValidationFailed.for_field(
            "invalid_sender", "address", "a short code is 3 to 8 digits"
        )
    if kind is SenderKind.ALPHANUMERIC and not _ALPHANUMERIC.match(address):
        raise ValidationFailed.for_field(
            "invalid_sender",
            "address",
            "an alphanumeric sender ID is 1 to 11 letters, digits or spaces, with a letter",
        )
    return address


def normalize_countries(countries: Collection[str] | None) -> list[str] | None:
    """Destination countries as stored: ISO 3166-1 alpha-2 codes, upper case, sorted, each
    once; None (the kind's default) stays None. An unknown code is `ValidationFailed`."""
    if countries is None:
        return None
    codes = sorted({code.strip().upper() for code in countries})
    unknown = [code for code in codes if phonenumbers.country_code_for_region(code) == 0]
    if unknown:
        raise ValidationFailed.for_field(
            "invalid_sender",
            "countries",
            f"not ISO 3166-1 alpha-2 country codes with a phone plan: {', '.join(unknown)}",
        )
    return codes


def served_countries(kind: str, address: str, countries: Collection[str] | None) -> frozenset[str]:
    """The destination countries a sender serves when picked from a pool: those set, else its
    kind's default. A long code (a toll-free number too) serves the country of its number; a
    short code or an alphanumeric ID serves none until set (neither names a country)."""
    if countries is not None:
        return frozenset(countries)
    if kind != SenderKind.LONG_CODE.value:
        return frozenset()
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(address, None))
    except phonenumbers.NumberParseException:
        return frozenset()
    return frozenset([region]) if region and region != "ZZ" else frozenset()


async def create_sender(
    session: AsyncSession,
    *,
    address: str,
    kind: SenderKind,
    provider: str,
    description: str | None,
    default_region: str,
    keywords: KeywordConfig | None = None,
    rate_per_second: float | None = None,
    fallback_provider: str | None = None,
    countries: Collection[str] | None = None,
) -> Sender:
    """Add a sender; its address must be unique. Keywords default to the built-in sets, the
    rate to what its kind allows by default (`app.kernel.sender_rates.default_rate`), the
    countries it serves from a pool to its kind's (`served_countries`)."""
    _check_providers(provider, fallback_provider)
    canonical = normalize_sender_address(kind, address, default_region)
    sender = Sender(
        id=uuid.uuid4(),
        address=canonical,
        kind=kind.value,
        provider=provider,
        fallback_provider=fallback_provider,
        rate_per_second=rate_per_second or default_rate(kind.value, canonical),
        description=description,
        keywords=(keywords or KeywordConfig()).model_dump(mode="json"),
        countries=normalize_countries(countries),
    )
    session.add(sender)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError:
        raise Conflict("sender_exists", f"a sender with address {sender.address} exists") from None
    return sender


def _check_providers(
    provider: str,
    fallback: str | None,
    *,
    supplied: tuple[str, ...] = ("provider", "fallback_provider"),
) -> None:
    """The names `supplied` by the caller are registered providers (app.providers.registry: the
    database keeps no list of them), and the two differ. A stored name is not judged again: a
    sender whose provider was unregistered stays readable and editable."""
    for field, name in (("provider", provider), ("fallback_provider", fallback)):
        if field in supplied and name is not None and PROVIDERS.get(name) is None:
            raise ValidationFailed.for_field(
                "invalid_sender",
                field,
                f"unknown provider {name!r}; one of: {', '.join(PROVIDERS.names())}",
            )
    if fallback is not None and fallback == provider:
        raise ValidationFailed.for_field(
            "invalid_sender", "fallback_provider", "must differ from the sender's provider"
        )


async def get_sender(
    session: AsyncSession, sender_id: uuid.UUID, *, for_update: bool = False
) -> Sender:
    """One sender, or `NotFound`. `for_update` locks its row until the transaction ends and
    reads it afresh: every change to a sender reads it so (a read-modify-write of its keyword
    config, say, without the lock loses a concurrent change). The lock is `FOR NO KEY UPDATE`:
    it never touches the key, so messages being stored meanwhile (whose foreign key takes a
    key-share lock on the sender) do not wait for it."""
    sender = await session.get(
        Sender,
        sender_id,
        with_for_update={"key_share": True} if for_update else None,
        populate_existing=for_update,
    )
    if sender is None:
        raise sender_not_found(sender_id)
    return sender


def sender_not_found(sender_id: uuid.UUID) -> NotFound:
    """The error for a sender id that names no sender."""
    return NotFound("sender_not_found", f"no sender with id {sender_id}")


def no_default_sender() -> ValidationFailed:
    """The refusal of a message without `from` from a client without a default sender."""
    return ValidationFailed.for_field(
        "no_default_sender", "from", "required: your client has no default sender"
    )


def unknown_sender(address: str) -> ValidationFailed:
    """The refusal of a message from an address that is not one of the caller's senders (the
    same whether it is another client's sender or no sender at all)."""
    return ValidationFailed.for_field(
        "unknown_sender", "from", f"{address!r} is not one of your senders"
    )


async def list_senders(session: AsyncSession, client_id: uuid.UUID | None = None) -> list[Sender]:
    """Every sender (or those granted to `client_id`), oldest first (there are few)."""
    query = select(Sender)
    if client_id is not None:
        query = query.where(Sender.id.in_(owned_sender_ids(client_id)))
    return list(await session.scalars(query.order_by(Sender.created_at, Sender.id)))


def owned_sender_ids(client_id: uuid.UUID) -> Select[uuid.UUID]:
    """The ids of the senders granted to a client, as a subquery."""
    return select(SenderClient.sender_id).where(SenderClient.client_id == client_id)


async def client_sender_ids(session: AsyncSession, client_id: uuid.UUID) -> list[uuid.UUID]:
    """The ids of the senders granted to a client, oldest grant first."""
    return list(
        await session.scalars(
            select(SenderClient.sender_id)
            .where(SenderClient.client_id == client_id)
            .order_by(SenderClient.created_at, SenderClient.sender_id)
        )
    )


async def get_owned_sender(
    session: AsyncSession, sender_id: uuid.UUID, client_id: uuid.UUID | None
) -> Sender:
    """A sender the caller may act for (`client_id` None: an admin, any sender), or the same
    `NotFound` as a sender that does not exist."""
    sender = await session.get(Sender, sender_id)
    if sender is None:
        raise sender_not_found(sender_id)
    if client_id is not None:
        granted = await session.get(SenderClient, (sender_id, client_id))
        if granted is None:
            raise sender_not_found(sender_id)
    return sender


def client_not_found(name: str) -> NotFound:
    """The error for a client name that names no client."""
    return NotFound("client_not_found", f"no client named {name!r}")


async def _client_by_name(session: AsyncSession, name: str) -> Client:
    client = await session.scalar(select(Client).where(Client.name == name))
    if client is None:
        raise client_not_found(name)
    return client


async def grant_sender(session: AsyncSession, sender_id: uuid.UUID, client_name: str) -> bool:
    """Let a client send from a sender (and see its inbound messages and opt-outs); True if
    the grant is new. Granting twice is harmless."""
    await get_sender(session, sender_id)
    client = await _client_by_name(session, client_name)
    inserted = await session.scalar(
        insert(SenderClient)
        .values(sender_id=sender_id, client_id=client.id)
        .on_conflict_do_nothing()
        .returning(SenderClient.sender_id)
    )
    return inserted is not None


async def revoke_sender(session: AsyncSession, sender_id: uuid.UUID, client_name: str) -> bool:
    """Take a sender away from a client (it stops being the client's default, if it was);
    True if it had been granted. Messages already accepted are delivered."""
    await get_sender(session, sender_id)
    client = await _client_by_name(session, client_name)
    removed = await session.scalar(
        delete(SenderClient)
        .where(SenderClient.sender_id == sender_id, SenderClient.client_id == client.id)
        .returning(SenderClient.sender_id)
    )
    await session.execute(
        update(Client)
        .where(Client.id == client.id, Client.default_sender_id == sender_id)
        .values(default_sender_id=None)
    )
    return removed is not None


async def sender_client_names(session: AsyncSession, sender_id: uuid.UUID) -> list[str]:
    """The names of the clients a sender is granted to, alphabetically."""
    await get_sender(session, sender_id)
    return list(
        await session.scalars(
            select(Client.name)
            .join(SenderClient, SenderClient.client_id == Client.id)
            .where(SenderClient.sender_id == sender_id)
            .order_by(Client.name)
        )
    )


async def update_sender(
    session: AsyncSession,
    sender_id: uuid.UUID,
    *,
    provider: str | None,
    description: str | None,
    keywords: KeywordConfig | None = None,
    rate_per_second: float | None = None,
    fallback_provider: str | Unchanged | None = UNCHANGED,
    countries: Collection[str] | Unchanged | None = UNCHANGED,
) -> Sender:
    """Change a sender's provider, description, keywords, rate, fallback provider or countries
    (its address and kind are its identity). None leaves a field as it is, except for the
    fallback provider and the countries, where None removes it (the countries: back to the
    kind's default) and `UNCHANGED` leaves it."""
    sender = await get_sender(session, sender_id, for_update=True)
    new_fallback = (
        sender.fallback_provider if isinstance(fallback_provider, Unchanged) else fallback_provider
    )
    supplied = tuple(
        field
        for field, given in (
            ("provider", provider is not None),
            ("fallback_provider", not isinstance(fallback_provider, Unchanged)),
        )
        if given
    )
    _check_providers(provider or sender.provider, new_fallback, supplied=supplied)
    sender.fallback_provider = new_fallback
    if not isinstance(countries, Unchanged):
        sender.countries = normalize_countries(countries)
    if rate_per_second is not None:
        sender.rate_per_second = rate_per_second
    if provider is not None:
        sender.provider = provider
    if description is not None:
        sender.description = description
    if keywords is not None:
        sender.keywords = keywords.model_dump(mode="json")
    await session.flush()
    # `updated_at` is set by the database on UPDATE, so the flush expired it; load it now, since
    # a lazy load when the response is built would be IO outside the async context.
    await session.refresh(sender, ["updated_at"])
    return sender


async def find_sender_by_address(
    session: AsyncSession, address: str, default_region: str
) -> Sender | None:
    """The sender with this address; a long code may be written in any phone format."""
    return (await find_senders_by_address(session, [address], default_region))[address]


async def find_senders_by_address(
    session: AsyncSession, addresses: Collection[str], default_region: str
) -> dict[str, Sender | None]:
    """`find_sender_by_address` for many addresses in one query (a CSV import's sender cells):
    the address as written first, else its canonical phone form."""
    canonical: dict[str, str] = {}
    for address in addresses:
        if PHONE_LIKE.match(address):
            try:
                canonical[address] = normalize_phone(address, default_region)
            except InvalidPhoneNumber:
                pass
    wanted = sorted({*addresses, *canonical.values()})
    found = {
        sender.address: sender
        for sender in await session.scalars(select(Sender).where(Sender.address.in_(wanted)))
    }
    return {
        address: found.get(address)
        or (found.get(canonical[address]) if address in canonical else None)
        for address in addresses
    }


async def upsert_sender(
    session: AsyncSession,
    *,
    address: str,
    kind: SenderKind,
    provider: str,
    description: str | None,
    keywords: KeywordConfig,
    default_region: str,
    rate_per_second: float | None = None,
    fallback_provider: str | None = None,
    countries: Collection[str] | None = None,
) -> bool:
    """Create the sender, or bring an existing one (same address) in line; True if created.

    For deployments that keep senders in configuration files (`smsgate seed-senders`): what
    the file omits takes its default (the kind's rate, no fallback provider, the kind's
    countries).
    """
    canonical = normalize_sender_address(kind, address, default_region)
    sender = await session.scalar(select(Sender).where(Sender.address == canonical))
    if sender is None:
        await create_sender(
            session,
            address=canonical,
            kind=kind,
            provider=provider,
            description=description,
            default_region=default_region,
            keywords=keywords,
            rate_per_second=rate_per_second,
            fallback_provider=fallback_provider,
            countries=countries,
        )
        return True
    if sender.kind != kind.value:
        raise ValidationFailed.for_field(
            "invalid_sender", "kind", f"{canonical} exists as a {sender.kind}, not a {kind.value}"
        )
    await update_sender(
        session,
        sender.id,
        provider=provider,
        description=description,
        keywords=keywords,
        rate_per_second=rate_per_second or default_rate(sender.kind, sender.address),
        fallback_provider=fallback_provider,
        countries=countries,
    )
    return False
