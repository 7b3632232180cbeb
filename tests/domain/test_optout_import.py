"""The bulk opt-out import, chunk by chunk: what stays recorded when the database fails midway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.consent.optout_import import ImportInterrupted, import_opt_outs
from app.db.models import OptOut
from app.db.session import SessionFactory, create_engine, create_session_factory
from tests.conftest import World


@pytest.fixture
async def unreachable() -> AsyncIterator[AsyncEngine]:
    """An engine on a port nothing listens on: a database that went away."""
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:9/gone", pool_size=1)
    yield engine
    await engine.dispose()


class FailsAfter:
    """Sessions of the real database for the first `working` transactions, then of one that is
    unreachable."""

    def __init__(self, real: SessionFactory, gone: SessionFactory, working: int) -> None:
        self.real, self.gone, self.left = real, gone, working
        self.opened = 0

    def __call__(self) -> AsyncSession:
        self.opened += 1
        return self.real() if self.opened <= self.left else self.gone()


def numbers(count: int) -> str:
    return "".join(f"+1415555{n:04d}\n" for n in range(count))


async def history_count(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(OptOut)) or 0)


async def test_chunks_before_a_failure_stay_and_the_error_says_where_it_stopped(
    session_factory: SessionFactory, world: World, unreachable: AsyncEngine
) -> None:
    sessions = FailsAfter(session_factory, create_session_factory(unreachable), working=2)

    with pytest.raises(ImportInterrupted) as raised:
        await import_opt_outs(
            cast(Any, sessions), numbers(25), actor="t", default_region="US", chunk_size=10
        )

    assert (raised.value.status, raised.value.code) == (503, "import_interrupted")
    assert (raised.value.line, raised.value.recorded) == (21, 20)
    assert "stopped at line 21" in raised.value.detail
    assert await history_count(session_factory) == 20  # two chunks of ten committed

    # Sent again whole once the database is back: only what was missing is recorded.
    result = await import_opt_outs(
        session_factory, numbers(25), actor="t", default_region="US", chunk_size=10
    )

    assert (result.recorded, result.unchanged) == (5, 20)
    assert await history_count(session_factory) == 25


async def test_each_chunk_is_a_transaction_of_its_own(
    session_factory: SessionFactory, world: World
) -> None:
    sessions = FailsAfter(session_factory, session_factory, working=10**6)

    result = await import_opt_outs(
        cast(Any, sessions), numbers(25), actor="t", default_region="US", chunk_size=10
    )

    assert result.recorded == 25
    assert sessions.opened == 3  # 10 + 10 + 5; no sender cells, so no lookup transaction


async def test_a_failure_that_is_not_an_outage_stays_an_error(
    session_factory: SessionFactory, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only unavailability is "interrupted, send it again": a refused statement (a bug) must
    reach the error handler as itself, not as a 503 a client retries for ever."""
    from sqlalchemy.exc import ProgrammingError

    from app.consent import optout_import

    async def refused(*_: Any, **__: Any) -> int:
        raise ProgrammingError("INSERT …", {}, Exception("syntax error"))

    monkeypatch.setattr(optout_import, "record_changes", refused)

    with pytest.raises(ProgrammingError):
        await import_opt_outs(
            session_factory, numbers(5), actor="t", default_region="US", chunk_size=10
        )
