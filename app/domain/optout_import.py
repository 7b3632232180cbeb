"""Bulk opt-out import from CSV: one number a line, optionally a sender address after it."""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.optouts import OptAction, OptChange, OptSource, record_changes
from app.domain.phone import InvalidPhoneNumber, normalize_phone
from app.domain.senders import find_sender_by_address
from app.errors import ValidationFailed

MAX_LINES = 100_000
MAX_SENDER_LENGTH = 40


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that was skipped."""

    line: int
    value: str
    reason: str


@dataclass(slots=True)
class ImportResult:
    """How many opt-outs were recorded, and the lines that were not."""

    recorded: int = 0
    errors: list[LineError] = field(default_factory=list)


async def import_opt_outs(
    session: AsyncSession, text: str, *, actor: str, default_region: str
) -> ImportResult:
    """Record an opt-out for every valid line; report the others with their line numbers.

    Columns: `phone[,sender]`; a first line whose first cell is `phone` is a header. Without a
    sender the opt-out applies to every sender.
    """
    rows = _read_rows(text)
    result = ImportResult()
    changes: list[OptChange] = []
    senders: dict[str, uuid.UUID | None] = {}
    for number, row in rows:
        cells = [cell.strip() for cell in row]
        if not any(cells) or (number == 1 and cells[0].lower() == "phone"):
            continue
        raw_phone = cells[0]
        try:
            phone = normalize_phone(raw_phone, default_region)
        except InvalidPhoneNumber as error:
            result.errors.append(LineError(number, raw_phone, str(error)))
            continue
        sender_id = None
        if len(cells) > 1 and cells[1]:
            if len(cells[1]) > MAX_SENDER_LENGTH or "\x00" in cells[1]:
                result.errors.append(LineError(number, cells[1], "not a sender address"))
                continue
            if cells[1] not in senders:
                sender = await find_sender_by_address(session, cells[1], default_region)
                senders[cells[1]] = sender.id if sender else None
            sender_id = senders[cells[1]]
            if sender_id is None:
                result.errors.append(LineError(number, cells[1], "not one of our senders"))
                continue
        changes.append(
            OptChange(phone, sender_id, OptAction.OPT_OUT, OptSource.IMPORT, actor, "bulk import")
        )
    if changes:
        await record_changes(session, changes)
    result.recorded = len(changes)
    return result


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
