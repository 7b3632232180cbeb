"""Query and path parameters shared by several endpoints, documented once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Path, Query
from pydantic import AwareDatetime

from app.kernel.pagination import encode_cursor
from app.kernel.text import StorableStr

_EXAMPLE_TIME = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
CURSOR_EXAMPLE = encode_cursor(_EXAMPLE_TIME, uuid.UUID("5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"))
"""A cursor as the lists keyed by a UUID (messages, inbound messages) issue it."""
SEQUENCE_CURSOR_EXAMPLE = encode_cursor(_EXAMPLE_TIME, 17)
"""A cursor as the lists keyed by a sequence number (opt-outs, events) issue it."""

LimitQuery = Annotated[
    int, Query(ge=1, le=100, description="How many items per page, 1 to 100.", examples=[20])
]
CursorQuery = Annotated[
    str | None,
    Query(
        description="`next_cursor` of the previous page; omit for the first page.",
        examples=[CURSOR_EXAMPLE],
    ),
]
SequenceCursorQuery = Annotated[
    str | None,
    Query(
        description="`next_cursor` of the previous page; omit for the first page.",
        examples=[SEQUENCE_CURSOR_EXAMPLE],
    ),
]
CreatedAfterQuery = Annotated[
    AwareDatetime | None,
    Query(
        description="Created at or after this instant (with a UTC offset).",
        examples=["2026-11-26T00:00:00Z"],
    ),
]
CreatedBeforeQuery = Annotated[
    AwareDatetime | None,
    Query(
        description="Created before this instant (with a UTC offset).",
        examples=["2026-11-27T00:00:00Z"],
    ),
]
SenderIdQuery = Annotated[
    uuid.UUID | None,
    Query(description="A sender's id.", examples=["0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"]),
]
MessageIdPath = Annotated[
    uuid.UUID,
    Path(description="The message's id.", examples=["5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"]),
]
SenderIdPath = Annotated[
    uuid.UUID,
    Path(description="The sender's id.", examples=["0f8e5c1e-2b7a-4d57-9a0c-7c1d2e3f4a5b"]),
]

ClientNamePath = Annotated[
    StorableStr,
    Path(min_length=1, max_length=200, description="The client's name.", examples=["shop"]),
]
