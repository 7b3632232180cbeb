"""/v1/clients/{client}/quiet-hours: a client's quiet hours (admin key)."""

from __future__ import annotations

from datetime import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.db.session import AFTER_COMMIT
from app.kernel.errors import Forbidden, NotFound, Unauthorized, ValidationFailed, problem_responses
from app.kernel.quiet_hours import QuietHours
from app.traffic import quiet_hours_admin as domain
from app.web.deps import AdminDep, LookupsDep, SessionDep

router = APIRouter(prefix="/v1/clients", tags=["traffic"])

ClientPath = Annotated[
    str, Path(max_length=200, description="The client's name.", examples=["shop"])
]


class QuietHoursIn(BaseModel):
    """A daily window of the recipient's local time: `start` included, `end` excluded; it may
    wrap midnight (21:00 to 08:00)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"start": "21:00", "end": "08:00"}]}
    )

    start: time = Field(description="Local time the window opens (HH:MM).")
    end: time = Field(description="Local time it closes; messages waiting then leave.")

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHoursIn:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("local times, without an offset")
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class QuietHoursOut(BaseModel):
    """A client's quiet hours; both null when it has none (no message ever waits)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"client": "shop", "start": "21:00:00", "end": "08:00:00"}]}
    )

    client: str
    start: time | None
    end: time | None


def _out(client: str, window: QuietHours | None) -> QuietHoursOut:
    return QuietHoursOut(
        client=client, start=window.start if window else None, end=window.end if window else None
    )


_ERRORS = problem_responses(Unauthorized, Forbidden, NotFound)


@router.get("/{client}/quiet-hours", response_model=QuietHoursOut, responses=_ERRORS)
async def get_quiet_hours(client: ClientPath, session: SessionDep, _admin: AdminDep) -> Any:
    """A client's quiet hours."""
    return _out(client, await domain.get_quiet_hours(session, client))


@router.put(
    "/{client}/quiet-hours",
    response_model=QuietHoursOut,
    responses=problem_responses(Unauthorized, Forbidden, NotFound, ValidationFailed),
)
async def put_quiet_hours(
    client: ClientPath,
    request: QuietHoursIn,
    session: SessionDep,
    lookups: LookupsDep,
    _admin: AdminDep,
) -> Any:
    """Set a client's quiet hours: its messages sent with `respect_quiet_hours` wait for the
    window's end when the recipient's local time is inside it. Other API processes see the
    change within `LOOKUP_CACHE_SECONDS`."""
    window = QuietHours(request.start, request.end)
    await domain.set_quiet_hours(session, client, window)
    session.info.setdefault(AFTER_COMMIT, []).append(lookups.forget_principals)
    return _out(client, window)


@router.delete("/{client}/quiet-hours", status_code=204, responses=_ERRORS)
async def delete_quiet_hours(
    client: ClientPath, session: SessionDep, lookups: LookupsDep, _admin: AdminDep
) -> Response:
    """Remove a client's quiet hours: no message of its waits for them any more (those already
    scheduled keep their time)."""
    await domain.set_quiet_hours(session, client, None)
    session.info.setdefault(AFTER_COMMIT, []).append(lookups.forget_principals)
    return Response(status_code=204)
