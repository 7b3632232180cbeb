"""`smsgate` subcommands for operators: API keys (`api-keys list|create|revoke|rotate`),
which clients may use a sender (`grant-sender`, `revoke-sender`, `sender-clients`), and a
client's credentials for the Twilio-compatible API (`twilio-credentials`).

They write straight to the database, as `create-api-key` does. Running API processes keep the
keys and senders they cached for `LOOKUP_CACHE_SECONDS`: a revocation, rotation or grant made
here is honoured by every API process within that time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from app.kernel.settings import get_settings

T = TypeVar("T")


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operators' subcommands to `smsgate`'s parser."""
    _add_api_keys(commands)
    _add_sender_grants(commands)
    twilio = commands.add_parser(
        "twilio-credentials",
        help="issue a client's account SID and auth token for the Twilio-compatible API "
        "(replacing its earlier token) and print them once",
    )
    twilio.add_argument("--client", required=True, help="the client's name")
    twilio.set_defaults(run=_twilio_credentials)


def _add_api_keys(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`api-keys list|create|revoke|rotate`."""
    keys = commands.add_parser(
        "api-keys",
        help="list, create, revoke or rotate API keys",
        description="Manage API keys. A key is shown once, when it is made; listings show its "
        "prefix. Revocations and rotations reach running API processes within "
        "LOOKUP_CACHE_SECONDS.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every key, revoked and expired ones included")
    listing.add_argument("--client", help="only this client's keys")
    listing.set_defaults(run=_list_keys)

    create = actions.add_parser("create", help="make a key and print it once")
    create.add_argument("--client", required=True, help="client name (created if new)")
    create.add_argument("--name", help="what the key is for, shown in listings")
    create.add_argument("--admin", action="store_true", help="may manage the service")
    create.add_argument(
        "--expires-in",
        type=_seconds(1, MAX_EXPIRES_IN_SECONDS),
        metavar="SECONDS",
        help="the key stops working after this (1 s to 100 years)",
    )
    create.set_defaults(run=_create_key)

    revoke = actions.add_parser("revoke", help="revoke a key now")
    revoke.add_argument("key", help="the key's id, or its prefix as listings show it")
    revoke.set_defaults(run=_revoke_key)

    rotate = actions.add_parser(
        "rotate", help="make a new key in place of one; the old one works for the overlap"
    )
    rotate.add_argument("key", help="the key's id, or its prefix as listings show it")
    rotate.add_argument(
        "--overlap",
        type=_seconds(0, MAX_OVERLAP_SECONDS),
        default=86400,
        metavar="SECONDS",
        help="how long the old key keeps working (default: %(default)s; 0: stops now)",
    )
    rotate.set_defaults(run=_rotate_key)


def _add_sender_grants(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`grant-sender`, `revoke-sender`, `sender-clients`."""
    for name, verb, run in (
        ("grant-sender", "let a client send from a sender", _grant),
        ("revoke-sender", "take a sender away from a client", _revoke_grant),
    ):
        command = commands.add_parser(name, help=verb)
        command.add_argument("sender", help="the sender's address")
        command.add_argument("--client", required=True, help="the client's name")
        command.set_defaults(run=run)
    clients = commands.add_parser("sender-clients", help="the clients that may use a sender")
    clients.add_argument("sender", help="the sender's address")
    clients.set_defaults(run=_sender_clients)


def _in_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction on the configured database; a refusal exits with 1."""
    from app.db.session import create_engine, create_session_factory
    from app.kernel.errors import ServiceError

    async def run() -> T:
        engine = create_engine(get_settings().database_url, pool_size=1)
        try:
            async with create_session_factory(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except ServiceError as error:
        sys.stderr.write(f"{error.detail}\n")
        raise SystemExit(1) from None


def _twilio_credentials(args: argparse.Namespace) -> int:
    from app.kernel.secrets import Keyring, install
    from app.twilio_api.vocabulary import issue_credentials

    install(Keyring.from_settings(get_settings()))  # the token is stored encrypted
    sid, token = _in_transaction(lambda session: issue_credentials(session, args.client))
    sys.stdout.write(f"account_sid\t{sid}\nauth_token\t{token}\n")
    return 0


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def _list_keys(args: argparse.Namespace) -> int:
    from app.access.api_keys import list_keys

    views = _in_transaction(lambda session: list_keys(session, args.client))
    sys.stdout.write("id\tclient\tname\tprefix\tadmin\tstatus\tcreated\tlast used\texpires\n")
    for view in views:
        key = view.key
        fields = (
            str(key.id),
            view.client_name,
            key.name or "-",
            key.prefix,
            "admin" if key.is_admin else "-",
            view.status,
            _when(key.created_at),
            _when(key.last_used_at),
            _when(key.expires_at),
        )
        sys.stdout.write("\t".join(fields) + "\n")
    return 0


# As the API bounds them: a rotation's overlap at most 30 days; an expiry within reach.
MAX_OVERLAP_SECONDS = 30 * 86400
MAX_EXPIRES_IN_SECONDS = 100 * 365 * 86400


def _seconds(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: whole seconds from `low` to `high` (argparse names the option)."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high} seconds")
        return value

    return parse


def _create_key(args: argparse.Namespace) -> int:
    from app.access.api_keys import create

    expires = datetime.now(UTC) + timedelta(seconds=args.expires_in) if args.expires_in else None

    async def work(session: AsyncSession) -> str:
        raw_key, _ = await create(
            session, args.client, name=args.name, is_admin=args.admin, expires_at=expires
        )
        return raw_key

    sys.stdout.write(_in_transaction(work) + "\n")
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from app.access.api_keys import revoke

    view = _in_transaction(lambda session: revoke(session, args.key))
    sys.stderr.write(f"revoked {view.key.prefix} ({view.client_name})\n")
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    from app.access.api_keys import rotate

    async def work(session: AsyncSession) -> tuple[str, str]:
        raw_key, _, old = await rotate(session, args.key, overlap=timedelta(seconds=args.overlap))
        return raw_key, f"{old.key.prefix} works until {_when(old.key.expires_at)}"

    raw_key, note = _in_transaction(work)
    sys.stdout.write(raw_key + "\n")
    sys.stderr.write(note + "\n")
    return 0


async def _sender_id(session: AsyncSession, address: str) -> uuid.UUID:
    from app.kernel.errors import NotFound
    from app.senders.service import find_sender_by_address

    sender = await find_sender_by_address(session, address, get_settings().default_region)
    if sender is None:
        raise NotFound("sender_not_found", f"no sender with address {address!r}")
    return sender.id


def _grant(args: argparse.Namespace) -> int:
    return _change_grant(args, grant=True)


def _revoke_grant(args: argparse.Namespace) -> int:
    return _change_grant(args, grant=False)


def _change_grant(args: argparse.Namespace, *, grant: bool) -> int:
    from app.senders.service import grant_sender, revoke_sender, sender_client_names

    async def work(session: AsyncSession) -> list[str]:
        sender_id = await _sender_id(session, args.sender)
        change = grant_sender if grant else revoke_sender
        await change(session, sender_id, args.client)
        return await sender_client_names(session, sender_id)

    names = _in_transaction(work)
    sys.stdout.write("".join(f"{name}\n" for name in names))
    return 0


def _sender_clients(args: argparse.Namespace) -> int:
    from app.senders.service import sender_client_names

    async def work(session: AsyncSession) -> list[str]:
        sender_id = await _sender_id(session, args.sender)
        return await sender_client_names(session, sender_id)

    sys.stdout.write("".join(f"{name}\n" for name in _in_transaction(work)))
    return 0
