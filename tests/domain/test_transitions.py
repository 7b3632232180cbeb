"""The state module's transaction runner, and a status callback racing a claim for real."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.consent.optouts import lock_recipients
from app.db.models import Message, MessageEvent, OptOut
from app.db.session import SessionFactory, Tx
from app.delivery.transitions import (
    TRANSACTION_ATTEMPTS,
    claim,
    is_retryable,
    release,
    resubmit,
    run_raw_transaction,
    run_transaction,
)
from tests.api.test_status_callbacks import sent_message, twilio_callback
from tests.conftest import World
from tests.domain.test_delivery import history, load, queued_message


def raising(sqlstate: str) -> str:
    """A statement that makes PostgreSQL itself raise an error with this SQLSTATE."""
    return f"DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = '{sqlstate}'; END $$"


async def test_a_deadlock_runs_the_whole_transaction_again(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)
    runs = 0

    async def work(session: AsyncSession) -> int:
        nonlocal runs
        runs += 1
        await session.execute(
            text("UPDATE messages SET body = body || '!' WHERE id = :id"), {"id": message_id}
        )
        if runs == 1:
            await session.execute(text(raising("40P01")))
        return runs

    result, events = await run_transaction(session_factory, work)

    assert (result, events) == (2, ())
    # The first run's write was rolled back with it: the change happened once.
    assert (await load(session_factory, message_id)).body.endswith("shipped.!")


async def test_a_serialization_failure_is_run_again_too(session_factory: SessionFactory) -> None:
    runs = 0

    async def work(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            await session.execute(text(raising("40001")))

    await run_transaction(session_factory, work)

    assert runs == 3


async def test_other_errors_are_not_retried(session_factory: SessionFactory) -> None:
    runs = 0

    async def work(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        await session.execute(text(raising("23505")))

    with pytest.raises(DBAPIError) as caught:
        await run_transaction(session_factory, work)

    assert runs == 1 and not is_retryable(caught.value)


async def test_the_retries_are_bounded(session_factory: SessionFactory) -> None:
    runs = 0

    async def work(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        await session.execute(text(raising("40P01")))

    with pytest.raises(DBAPIError) as caught:
        await run_transaction(session_factory, work)

    assert runs == TRANSACTION_ATTEMPTS and is_retryable(caught.value)


async def _waiting_on_a_lock(session_factory: SessionFactory, other_than: int) -> None:
    """Until another backend waits on a lock (the callback, blocked by the claim)."""
    for _ in range(500):
        async with session_factory() as session:
            waiting = await session.scalar(
                select(func.count())
                .select_from(text("pg_stat_activity"))
                .where(
                    text("wait_event_type = 'Lock'"),
                    text("datname = current_database()"),
                    text(f"pid <> {other_than}"),
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the callback never waited for the claim's locks")


async def test_an_opt_out_callback_racing_a_claim_waits_then_succeeds(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """The claim takes the recipient's lock, then the message row; the callback, arriving in
    between, must queue behind it (same order), not take the row first and deadlock."""
    message_id = await sent_message(session_factory, world)
    async with session_factory() as claim, claim.begin():
        claim_pid = await claim.scalar(select(func.pg_backend_pid()))
        assert claim_pid is not None
        await lock_recipients(claim, ["+14155550123"])
        callback = asyncio.create_task(
            twilio_callback(api, message_id, "undelivered", ErrorCode="21610")
        )
        await _waiting_on_a_lock(session_factory, other_than=claim_pid)
        # The claim's UPDATE of the message row: with the callback holding the row (the old
        # order), PostgreSQL would abort one of the two as a deadlock.
        await claim.execute(
            text("UPDATE messages SET updated_at = now() WHERE id = :id"), {"id": message_id}
        )
        assert not callback.done()  # still waiting for the claim to commit
    response = await callback

    assert response.status_code == 204, response.text
    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("undelivered", "21610")
    async with session_factory() as session:
        opt_outs = await session.scalar(
            select(func.count()).select_from(OptOut).where(OptOut.phone == "+14155550123")
        )
    assert opt_outs == 1


async def test_a_callback_aborted_by_a_deadlock_is_recorded_not_answered_500(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """PostgreSQL aborts the callback's transaction once (40P01, raised by a trigger on the
    history table): the endpoint runs it again and acknowledges."""
    message_id = await sent_message(session_factory, world)
    name = f"deadlock_once_{uuid.uuid4().hex[:8]}"
    async with session_factory.begin() as session:
        await session.execute(text(f"CREATE SEQUENCE {name}"))
        await session.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF nextval('{name}') = 1 THEN "
                "RAISE EXCEPTION 'forced deadlock' USING ERRCODE = '40P01'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        await session.execute(
            text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON message_events "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
        )
    try:
        response = await twilio_callback(api, message_id, "delivered")
    finally:
        async with session_factory.begin() as session:
            await session.execute(text(f"DROP TRIGGER {name} ON message_events"))
            await session.execute(text(f"DROP FUNCTION {name}()"))
            await session.execute(text(f"DROP SEQUENCE {name}"))

    assert response.status_code == 204, response.text
    assert (await load(session_factory, message_id)).status == "delivered"
    async with session_factory() as session:
        assert (
            await session.scalar(
                select(func.count()).select_from(Message).where(Message.status == "delivered")
            )
            == 1
        )


async def test_a_decision_about_a_claim_put_back_misses_the_claim_after_it(
    session_factory: SessionFactory, world: World
) -> None:
    """A put-back does not count as an attempt, so the next claim has the same attempt number;
    reconciliation's decision about the first claim must not hit the second (a resend)."""
    message_id = await queued_message(session_factory, world)

    async def claim_it(tx: Tx) -> Message:
        claimed = await claim(tx, [message_id])
        return claimed.claimed[0]

    first, _ = await run_raw_transaction(session_factory, claim_it)

    async def put_back(session: AsyncSession) -> bool:
        return await release(session, first, "the sender's pace", first.provider, quiet=True)

    assert (await run_transaction(session_factory, put_back))[0]
    second, _ = await run_raw_transaction(session_factory, claim_it)
    assert second.attempts == first.attempts and second.claimed_at != first.claimed_at

    async def stale_resubmit(session: AsyncSession) -> int | None:
        return await resubmit(session, first, "reconcile found nothing")

    assert (await run_transaction(session_factory, stale_resubmit))[0] is None
    message = await load(session_factory, message_id)
    assert (message.status, message.attempts, message.resubmissions) == ("sending", 1, 0)


async def test_a_quiet_put_back_reads_as_never_claimed_and_is_not_due_until_its_turn(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)

    async def claim_it(tx: Tx) -> Message:
        return (await claim(tx, [message_id])).claimed[0]

    claimed, _ = await run_raw_transaction(session_factory, claim_it)

    async def put_back(session: AsyncSession) -> bool:
        reason = "the sender's pace; next turn in 30.0s"
        return await release(session, claimed, reason, claimed.provider, quiet=True, retry_in=30)

    await run_transaction(session_factory, put_back)
    message = await load(session_factory, message_id)
    assert (message.status, message.attempts) == ("queued", 0)
    async with session_factory() as session:
        due_in = await session.scalar(
            select(func.extract("epoch", Message.next_attempt_at - func.now())).where(
                Message.id == message_id
            )
        )
    assert due_in is not None and 29 <= float(due_in) <= 30  # the sweep leaves it alone
    assert await history(session_factory, message_id) == []  # no `sending` shown


# ---- The raw road: plain asyncpg statements and an ORM session in one transaction ----------


async def test_a_raw_transaction_is_run_again_after_a_deadlock_with_its_writes_undone(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)
    runs = 0

    async def work(tx: Tx) -> int:
        nonlocal runs
        runs += 1
        await tx.fetch("UPDATE messages SET body = body || '!' WHERE id = $1", message_id)
        if runs == 1:
            await tx.fetch(raising("40P01"))
        return runs

    result, _ = await run_raw_transaction(session_factory, work)

    assert result == 2
    assert (await load(session_factory, message_id)).body.endswith("shipped.!")


async def test_a_raw_transaction_and_its_orm_session_commit_or_roll_back_together(
    session_factory: SessionFactory, world: World
) -> None:
    """The session's work is a savepoint inside the raw transaction: both are kept, or neither."""
    message_id = await queued_message(session_factory, world)

    async def both(tx: Tx, fail: bool) -> None:
        await tx.fetch("UPDATE messages SET body = 'raw' WHERE id = $1", message_id)
        session = await tx.session()
        await session.execute(
            text("UPDATE messages SET error_message = 'orm' WHERE id = :id"), {"id": message_id}
        )
        if fail:
            await tx.fetch(raising("23505"))

    with pytest.raises(asyncpg.UniqueViolationError):
        await run_raw_transaction(session_factory, lambda tx: both(tx, fail=True))
    message = await load(session_factory, message_id)
    assert (message.body, message.error_message) != ("raw", "orm")
    assert message.body != "raw" and message.error_message != "orm"

    await run_raw_transaction(session_factory, lambda tx: both(tx, fail=False))
    message = await load(session_factory, message_id)
    assert (message.body, message.error_message) == ("raw", "orm")


async def test_a_raw_transactions_connection_that_died_is_not_handed_out_again(
    session_factory: SessionFactory,
) -> None:
    """A backend killed under a raw transaction (a PostgreSQL restart) fails that transaction
    once; the next one gets a live connection, not the dead one back from the pool."""

    async def own_pid(tx: Tx) -> int:
        pid: int = (await tx.fetch("SELECT pg_backend_pid()"))[0][0]
        return pid

    async def killed(tx: Tx) -> None:
        pid = await own_pid(tx)
        async with session_factory() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await asyncio.sleep(0.05)
        await tx.fetch("SELECT 1")

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await run_raw_transaction(session_factory, killed)
    for _ in range(3):  # whichever pooled connection comes next is alive
        pid, _ = await run_raw_transaction(session_factory, own_pid)
        assert pid > 0


async def test_a_raw_transaction_cancelled_mid_statement_leaves_no_busy_connection_behind(
    session_factory: SessionFactory,
) -> None:
    """Cancelled while PostgreSQL runs its statement (a job timeout): the connection is
    closed, not returned to the pool mid-statement for the next job to trip on."""

    async def slow(tx: Tx) -> None:
        await tx.fetch("SELECT pg_sleep(5)")

    task = asyncio.create_task(run_raw_transaction(session_factory, slow))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def ping(tx: Tx) -> int:
        value: int = (await tx.fetch("SELECT 1"))[0][0]
        return value

    for _ in range(3):
        assert (await asyncio.wait_for(run_raw_transaction(session_factory, ping), 2))[0] == 1


async def test_a_run_of_waits_for_one_reason_is_one_counted_note(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)

    async def wait_once(reason: str) -> None:
        async def claim_it(tx: Tx) -> Message:
            return (await claim(tx, [message_id])).claimed[0]

        claimed, _ = await run_raw_transaction(session_factory, claim_it)

        async def put_back(session: AsyncSession) -> bool:
            return await release(session, claimed, reason, claimed.provider, quiet=True)

        assert (await run_transaction(session_factory, put_back))[0]

    for wait in (0.4, 0.3, 0.2):
        await wait_once(f"the sender's pace; next turn in {wait}s")
    await wait_once("circuit open; again in 12.0s")
    await wait_once("the sender's pace; next turn in 0.1s")

    async with session_factory() as session:
        rows = (
            await session.execute(
                select(MessageEvent.status, MessageEvent.detail)
                .where(MessageEvent.message_id == message_id)
                .order_by(MessageEvent.id)
            )
        ).all()
    # No claim rows left (waiting is never an attempt); one note per run, the last detail kept.
    assert [status for status, _ in rows] == [None, None, None]
    first, circuit, again = (detail or "" for _, detail in rows)
    assert first.startswith("not sent: the sender's pace; next turn in 0.2s (3 times since ")
    assert circuit == "not sent: circuit open; again in 12.0s"
    assert again == "not sent: the sender's pace; next turn in 0.1s"
    assert (await load(session_factory, message_id)).attempts == 0
