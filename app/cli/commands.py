"""`smsgate` subcommands for people at a terminal: `dev`, `services`, `send`, `import-opt-outs`.

`app/cli/main.py` registers them with `add_commands`; each sets `run`, which returns the exit
status.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.kernel.settings import get_settings

DEFAULT_API_URL = "http://127.0.0.1:8000"
SEND_WAIT_SECONDS = 30.0
IMPORT_BATCH_LINES = 5000


# Descriptions keep their line breaks.
_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the subcommands of this module to `smsgate`'s parser."""
    _add_dev(commands)
    _add_services(commands)
    _add_send(commands)
    _add_import_opt_outs(commands)


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the embedded servers keep their data (default: DEV_DATA_DIR, .data)",
    )


def _add_dev(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser(
        "dev",
        help="run everything for development: database, Redis, migrations, API and a worker",
        description="Run the API and one worker with the fake provider, for trying smsgate.\n\n"
        "With DATABASE_URL / REDIS_URL set, uses them; otherwise starts an embedded PostgreSQL\n"
        "and Redis with their data in DEV_DATA_DIR (.data). Creates and migrates the database,\n"
        "ensures a development sender (+14155550100, fake provider) and client, prints the docs\n"
        "URL and an API key (kept in DIR/dev-api-key), and stops everything on Ctrl-C.",
        formatter_class=_FORMATTER,
    )
    dev.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    dev.add_argument("--port", type=int, default=8000, help="port the API listens on")
    _data_option(dev)
    dev.set_defaults(run=_dev)


def _add_services(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    services = commands.add_parser(
        "services",
        help="start or stop the embedded PostgreSQL and Redis (detached)",
        description="Start or stop the embedded PostgreSQL and Redis in the background.\n\n"
        "`start` prints `export` lines for DATABASE_URL, REDIS_URL, TEST_ADMIN_DATABASE_URL and\n"
        'TEST_REDIS_URL: eval "$(smsgate services start)". PostgreSQL listens on a unix socket\n'
        "in DIR/postgres, Redis on a free port of 127.0.0.1.",
        formatter_class=_FORMATTER,
    )
    services.add_argument("action", choices=["start", "stop"], help="start or stop both servers")
    _data_option(services)
    services.set_defaults(run=_services)


def _add_send(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser(
        "send",
        help="send a message through the HTTP API, as a client would",
        description="Send a message through a running API and print it as JSON.\n\n"
        "With --wait, follow it until it reaches a final status: the exit status is 0 when it\n"
        "was delivered, 1 when it failed, was undelivered, expired, canceled or rejected, or\n"
        "did not settle in time.",
        formatter_class=_FORMATTER,
    )
    send.add_argument("--to", required=True, help="recipient, E.164 or national format")
    send.add_argument("--body", required=True, help="message text")
    send.add_argument(
        "--from", dest="sender", help="sender address (default: the client's default sender)"
    )
    send.add_argument(
        "--api-url",
        help="API base URL (default: SMSGATE_API_URL, else the URL a running `smsgate dev` "
        f"keeps in DEV_DATA_DIR/dev-api-url, else {DEFAULT_API_URL})",
    )
    send.add_argument(
        "--api-key",
        help="API key (default: SMSGATE_API_KEY, else the key `smsgate dev` keeps in "
        "DEV_DATA_DIR/dev-api-key)",
    )
    send.add_argument("--idempotency-key", help="sent as the Idempotency-Key header")
    send.add_argument(
        "--wait", action="store_true", help="wait for a final status; exit 1 unless delivered"
    )
    send.add_argument(
        "--timeout",
        type=float,
        default=SEND_WAIT_SECONDS,
        help="how long --wait waits, in seconds (default: %(default)s)",
    )
    send.set_defaults(run=_send)


def _add_import_opt_outs(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    optouts = commands.add_parser(
        "import-opt-outs",
        help="record opt-outs from a CSV file, straight into the database",
        description="Record opt-outs from a CSV file of `phone[,sender address]` lines (an\n"
        "optional `phone,sender` header), in batches of one transaction each, showing progress.\n"
        "Invalid numbers and unknown senders are reported with their line numbers; the other\n"
        "lines are recorded. Exit status 1 when any line was skipped.",
        formatter_class=_FORMATTER,
    )
    optouts.add_argument("file", help="the CSV file, or - for standard input")
    optouts.add_argument(
        "--batch-size",
        type=int,
        default=IMPORT_BATCH_LINES,
        help="lines per transaction (default: %(default)s)",
    )
    optouts.add_argument(
        "--actor", help="who is recorded as making the change (default: operator:<user>)"
    )
    optouts.set_defaults(run=_import_opt_outs)


def _data_dir(args: argparse.Namespace) -> Path:
    data: Path | None = args.data
    return data if data is not None else get_settings().dev_data_dir


def _dev(args: argparse.Namespace) -> int:
    from app.dev.mode import run_dev

    return run_dev(args.host, args.port, _data_dir(args))


def _services(args: argparse.Namespace) -> int:
    import shlex

    from app.dev import embedded

    data_dir = _data_dir(args).resolve()
    try:
        if args.action == "stop":
            stops = (("Redis", embedded.stop_redis), ("PostgreSQL", embedded.stop_postgres))
            for name, stop in stops:
                sys.stderr.write(f"{name}: {'stopped' if stop(data_dir) else 'not running'}\n")
            return 0
        postgres = embedded.start_postgres(data_dir, "smsgate")
        redis = embedded.start_redis(data_dir)
    except embedded.EmbeddedServiceError as error:
        sys.stderr.write(f"smsgate services: {error}\n")
        return 1
    for name, server in (("PostgreSQL", postgres), ("Redis", redis)):
        state = "started" if server.started else "already running"
        sys.stderr.write(f"{name}: {state}, data in {data_dir}\n")
    variables = {
        "DATABASE_URL": postgres.url,
        "REDIS_URL": redis.url,
        # The tests create their own database through the `postgres` one, and use Redis db 15.
        "TEST_ADMIN_DATABASE_URL": embedded.postgres_url(Path(postgres.host), "postgres"),
        "TEST_REDIS_URL": f"redis://{redis.host}/15",
    }
    for name, value in variables.items():
        sys.stdout.write(f"export {name}={shlex.quote(value)}\n")
    return 0


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _send(args: argparse.Namespace) -> int:
    import httpx

    from app.dev.mode import read_api_key, read_api_url
    from app.kernel.status import TERMINAL_STATUSES, MessageStatus

    args.api_url = (
        args.api_url
        or os.environ.get("SMSGATE_API_URL")
        or read_api_url(get_settings().dev_data_dir)
        or DEFAULT_API_URL
    )
    api_key = args.api_key or os.environ.get("SMSGATE_API_KEY")
    if not api_key:
        api_key = read_api_key(get_settings().dev_data_dir)
    if not api_key:
        sys.stderr.write(
            "smsgate send: no API key: pass --api-key, set SMSGATE_API_KEY, or run smsgate dev\n"
        )
        return 2
    payload = {"to": args.to, "body": args.body}
    if args.sender:
        payload["from"] = args.sender
    headers = {"Authorization": f"Bearer {api_key}"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    with httpx.Client(base_url=args.api_url.rstrip("/"), headers=headers, timeout=10.0) as http:
        try:
            response = http.post("/v1/messages", json=payload)
            if response.status_code not in (200, 201, 202):
                sys.stderr.write(f"smsgate send: HTTP {response.status_code}: {response.text}\n")
                return 1
            message = response.json()
            if not args.wait:
                _print_json(message)
                return 0
            deadline = time.monotonic() + args.timeout
            status = message["status"]
            sys.stderr.write(f"{message['id']}: {status}\n")
            while status not in TERMINAL_STATUSES:
                if time.monotonic() > deadline:
                    _print_json(message)
                    sys.stderr.write(
                        f"smsgate send: still {status} after {args.timeout:g} s; giving up\n"
                    )
                    return 1
                time.sleep(0.25)
                response = http.get(f"/v1/messages/{message['id']}")
                response.raise_for_status()
                message = response.json()
                if message["status"] != status:
                    status = message["status"]
                    sys.stderr.write(f"{message['id']}: {status}\n")
        except httpx.HTTPError as error:
            sys.stderr.write(f"smsgate send: {args.api_url}: {error}\n")
            return 1
    _print_json(message)
    return 0 if status == MessageStatus.DELIVERED else 1


def _import_opt_outs(args: argparse.Namespace) -> int:
    from app.consent.optout_import import MAX_LINES

    if not 1 <= args.batch_size < MAX_LINES:
        sys.stderr.write(f"smsgate import-opt-outs: --batch-size is 1 to {MAX_LINES - 1}\n")
        return 2
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        sys.stderr.write(f"smsgate import-opt-outs: {error}\n")
        return 1
    actor = args.actor or f"operator:{_user()}"
    batches = split_csv_lines(text.removeprefix("\ufeff"), args.batch_size)
    try:
        recorded, skipped = asyncio.run(_import_batches(batches, actor))
    except _BatchRefused as error:
        sys.stderr.write(f"smsgate import-opt-outs: {error}\n")
        return 1
    sys.stdout.write(f"{recorded} opt-outs recorded, {skipped} lines skipped\n")
    return 1 if skipped else 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return str(os.getuid())


class _BatchRefused(Exception):
    """The import refused a whole batch (unreadable CSV); earlier batches stay recorded."""


@dataclass(frozen=True, slots=True)
class CsvBatch:
    """Lines `first`..`last` (1-based) of a CSV file, as text the import reads on its own."""

    text: str
    first: int
    last: int
    prefixed: bool  # one line was put before the file's lines (see split_csv_lines)


def split_csv_lines(text: str, batch_lines: int) -> list[CsvBatch]:
    """Cut a CSV file into batches of about `batch_lines` lines, never inside a record.

    The import reads each batch on its own, so every batch after the first starts with a line of
    just the file's delimiter: its cells are empty, so it is skipped, yet it keeps a first line
    starting with `phone` from passing for a header, and it makes the import detect the same
    delimiter as in the first batch (it takes `;` when the first non-empty line has a `;` and no
    `,`, as app/consent/optout_import.py does).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = io.StringIO(text).readlines()
    first_line = next((line for line in lines if line.strip()), "")
    delimiter = ";" if ";" in first_line and "," not in first_line else ","
    reader = csv.reader(io.StringIO(text))
    record_ends = [reader.line_num for _row in reader]  # a quoted cell may span lines
    batches: list[CsvBatch] = []
    start = 0
    for end in record_ends:
        if end - start >= batch_lines or end == record_ends[-1]:
            prefix = delimiter + "\n" if start else ""
            batches.append(
                CsvBatch(prefix + "".join(lines[start:end]), start + 1, end, bool(start))
            )
            start = end
    if start < len(lines):  # blank lines after the last record
        prefix = delimiter + "\n" if start else ""
        batches.append(
            CsvBatch(prefix + "".join(lines[start:]), start + 1, len(lines), bool(start))
        )
    return batches


async def _import_batches(batches: list[CsvBatch], actor: str) -> tuple[int, int]:
    """Import each batch in its own transaction; report skipped lines and progress on stderr."""
    from app.consent.optout_import import import_opt_outs
    from app.db.session import create_engine, create_session_factory
    from app.kernel.errors import ServiceError

    settings = get_settings()
    engine = create_engine(settings.database_url, pool_size=1)
    sessions = create_session_factory(engine)
    total = batches[-1].last if batches else 0
    recorded = skipped = 0
    try:
        for batch in batches:
            # The batch's line k is the file's line first + k - 1 (first + k - 2 after a prefix).
            offset = batch.first - (2 if batch.prefixed else 1)
            try:
                result = await import_opt_outs(
                    sessions, batch.text, actor=actor, default_region=settings.default_region
                )
            except ServiceError as error:
                raise _BatchRefused(
                    f"lines {batch.first}-{batch.last} not imported: {error.detail}"
                ) from None
            recorded += result.recorded
            skipped += len(result.errors)
            for line_error in result.errors:
                sys.stderr.write(
                    f"line {line_error.line + offset}: {line_error.value!r}: {line_error.reason}\n"
                )
            sys.stderr.write(f"{batch.last}/{total} lines\n")
            sys.stderr.flush()
    finally:
        await engine.dispose()
    return recorded, skipped
