"""Bulk opt-out import from CSV: one number a line, optionally a sender address after it."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from dataclasses import dataclass, field

from app.consent.optouts import OptAction, OptChange, OptSource, record_changes
from app.db.session import SessionFactory
from app.kernel.errors import Unavailable, ValidationFailed
from app.kernel.outages import unavailable_dependency
from app.kernel.phone import InvalidPhoneNumber, normalize_phone
from app.senders.service import find_senders_by_address

MAX_LINES = 100_000
MAX_SENDER_LENGTH = 40
# Numbers recorded per transaction: each chunk holds its numbers' recipient locks until it
# commits (a thousand numbers take up to 630 of the 1,024 lock buckets, for some milliseconds).
CHUNK_SIZE = 1000


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that was skipped."""

    line: int
    value: str
    reason: str


@dataclass(slots=True)
class ImportResult:
    """How many opt-outs were recorded, how many lines changed nothing (the number was already
    opted out in that scope, or the line repeats an earlier one), and the lines skipped."""

    recorded: int = 0
    unchanged: int = 0
    errors: list[LineError] = field(default_factory=list)


class ImportInterrupted(Unavailable):
    """The database failed during an import: the chunks before `line` are recorded."""

    def __init__(self, line: int, recorded: int) -> None:
        done = f"lines before it are recorded ({recorded} opt-outs)" if line > 1 else "nothing"
        super().__init__(
            "import_interrupted",
            f"the import stopped at line {line}, the database being unreachable: {done}. "
            f"Send the file again (or its lines from {line} on): numbers already opted out "
            "are not recorded twice.",
            headers={"Retry-After": "5"},
        )
        self.line = line
        self.recorded = recorded


async def import_opt_outs(
    session_factory: SessionFactory,
    text: str,
    *,
    actor: str,
    default_region: str,
    chunk_size: int = CHUNK_SIZE,
) -> ImportResult:
    """Record an opt-out for every valid line; report the others with their line numbers.

    Columns: `phone[,sender]`; a first line whose first cell is `phone` is a header. Without a
    sender the opt-out applies to every sender. A file that cannot be read (too many lines,
    broken quoting) is refused before anything is recorded; then the numbers of each
    `chunk_size` lines are recorded in a transaction of their own, holding only their locks:
    sends and STOPs to other numbers wait at most for one chunk. A database failure raises
    `ImportInterrupted`, saying where the import stopped (earlier chunks stay recorded).
    """
    rows = _read_rows(text)
    result = ImportResult()
    senders = await _resolve_senders(session_factory, rows, default_region)
    for start in range(0, len(rows), chunk_size):
        lines = rows[start : start + chunk_size]
        # Parsing a thousand numbers takes about 0.1 s of CPU: in a thread, so that the API's
        # other requests are answered meanwhile.
        chunk, errors, repeated = await asyncio.to_thread(
            _parse, lines, senders, actor=actor, default_region=default_region
        )
        result.errors.extend(errors)
        result.unchanged += repeated
        await _record_chunk(session_factory, chunk, lines[0][0], result)
    return result


def _parse(
    lines: list[tuple[int, list[str]]],
    senders: dict[str, uuid.UUID | None],
    *,
    actor: str,
    default_region: str,
) -> tuple[dict[tuple[str, uuid.UUID | None], OptChange], list[LineError], int]:
    """The changes of these lines (each scope once), the lines skipped, how many repeated."""
    chunk: dict[tuple[str, uuid.UUID | None], OptChange] = {}
    errors: list[LineError] = []
    repeated = 0
    for number, row in lines:
        cells = [cell.strip() for cell in row]
        if not any(cells) or (number == 1 and cells[0].lower() == "phone"):
            continue
        raw_phone = cells[0]
        try:
            phone = normalize_phone(raw_phone, default_region)
        except InvalidPhoneNumber as error:
            errors.append(LineError(number, raw_phone, str(error)))
            continue
        sender_id = None
        if len(cells) > 1 and cells[1]:
            if not _sender_cell_ok(cells[1]):
                errors.append(LineError(number, cells[1], "not a sender address"))
                continue
            sender_id = senders[cells[1]]
            if sender_id is None:
                errors.append(LineError(number, cells[1], "not one of our senders"))
                continue
        if (phone, sender_id) in chunk:
            repeated += 1
            continue
        chunk[phone, sender_id] = OptChange(
            phone, sender_id, OptAction.OPT_OUT, OptSource.IMPORT, actor, "bulk import"
        )
    return chunk, errors, repeated


async def _record_chunk(
    session_factory: SessionFactory,
    chunk: dict[tuple[str, uuid.UUID | None], OptChange],
    first_line: int,
    result: ImportResult,
) -> None:
    """Record one chunk in a transaction of its own and count it in `result`."""
    if not chunk:
        return
    try:
        async with session_factory() as session, session.begin():
            recorded = await record_changes(session, list(chunk.values()))
    except Exception as error:
        # Only unavailability is "interrupted, send it again"; anything else is a bug and stays
        # an error (a 500 with its traceback logged), not a 503 a client retries for ever.
        if unavailable_dependency(error) != "postgresql":
            raise
        raise ImportInterrupted(first_line, result.recorded) from None
    result.recorded += recorded
    result.unchanged += len(chunk) - recorded


def _sender_cell_ok(cell: str) -> bool:
    return len(cell) <= MAX_SENDER_LENGTH and "\x00" not in cell


async def _resolve_senders(
    session_factory: SessionFactory, rows: list[tuple[int, list[str]]], default_region: str
) -> dict[str, uuid.UUID | None]:
    """The sender id of every well-formed sender cell in the file (None: not one of ours), in
    one short transaction before any chunk."""
    cells = {
        row[1].strip()
        for _, row in rows
        if len(row) > 1 and row[1].strip() and _sender_cell_ok(row[1].strip())
    }
    senders: dict[str, uuid.UUID | None] = {}
    if not cells:
        return senders
    try:
        async with session_factory() as session, session.begin():
            found = await find_senders_by_address(session, cells, default_region)
        senders = {cell: sender.id if sender else None for cell, sender in found.items()}
    except Exception as error:
        if unavailable_dependency(error) != "postgresql":
            raise
        raise ImportInterrupted(1, 0) from None
    return senders


def _read_rows(text: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each record: a BOM and any line ending are fine, and a file
    whose first line has semicolons but no commas is read as semicolon-separated."""
    text = text.removeprefix("\ufeff")
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = ";" if ";" in first_line and "," not in first_line else ","
    reader = csv.reader(io.StringIO(text, newline=None), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if len(rows) >= MAX_LINES:
                raise ValidationFailed.for_field(
                    "too_many_lines", "body", f"at most {MAX_LINES} lines per import"
                )
            rows.append((reader.line_num, row))
    except csv.Error as error:
        raise ValidationFailed.for_field(
            "invalid_csv", "body", f"line {reader.line_num}: {error}"
        ) from None
    return rows
